# Renders examples/nginx.nix into an nginx.conf the way NixOS's nginx module writes one
# (`location <name> { proxy_pass …; <extraConfig> }` inside a `server` per virtual host), with a
# plain listener on loopback instead of TLS, for `nginx -t` and a real nginx in the tests.
{ lib, hearthPort, listen, prefix }:
let
  example = import ../../examples/nginx.nix { config.services.hearth.port = hearthPort; };
  nginx = example.services.nginx;
  location = name: l: ''
    location ${name} {
    ${lib.optionalString (l ? proxyPass) "proxy_pass ${l.proxyPass};"}
    ${l.extraConfig or ""}
    }
  '';
  server = name: v: ''
    server {
    listen ${listen};
    server_name ${name} localhost 127.0.0.1;
    ${lib.concatStrings (lib.mapAttrsToList location (v.locations or { }))}
    ${v.extraConfig or ""}
    }
  '';
in
''
  pid ${prefix}/nginx.pid;
  error_log ${prefix}/error.log;
  daemon off;
  events { }
  http {
  access_log off;
  client_body_temp_path ${prefix}/body;
  proxy_temp_path ${prefix}/proxy;
  ${builtins.replaceStrings [ "/var/cache/nginx/hearth" ] [ "${prefix}/cache" ] (nginx.appendHttpConfig or "")}
  ${lib.concatStrings (lib.mapAttrsToList server nginx.virtualHosts)}
  }
''
