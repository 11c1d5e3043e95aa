# nginx in front of hearth for nix-cache.<domain>: TLS, large bodies streamed (not buffered),
# narinfos cached briefly, NARs passed through. Import it on the build host next to the module.
#
# What is public is a choice made here: the binary cache (nix-cache-info, narinfos, `.ls`
# listings, NARs) is for every client; the operator's pages (the fleet page `/` and
# `/fleet.json`, `/metrics`, build logs under `/log/`) only for `operators`. They hold nothing
# secret, but they tell anyone what every host runs and where builds fail.
{ config, ... }:

let
  domain = "home.2rjus.net";
  upstream = "http://127.0.0.1:${toString config.services.hearth.port}";
  # Who may see the operator's pages: add your admin network (e.g. "10.0.0.0/24").
  operators = [ "127.0.0.1" "::1" ];
  operatorsOnly = builtins.concatStringsSep "" (map (a: "allow ${a};\n") operators) + "deny all;\n";
  # The operator's pages: the fleet page, its JSON, the metrics and build logs.
  operatorPages = builtins.listToAttrs (map (path: {
    name = path;
    value = { proxyPass = upstream; extraConfig = proxied + operatorsOnly; };
  }) [ "= /" "= /fleet.json" "= /metrics" "/log/" ]);
  proxied = ''
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    # hearth shares its stream bounds out by client address (its trusted_proxies).
    proxy_set_header X-Forwarded-For $remote_addr;
  '';
in
{
  services.nginx = {
    enable = true;
    recommendedTlsSettings = true;
    recommendedOptimisation = true;
    appendHttpConfig = ''
      proxy_cache_path /var/cache/nginx/hearth levels=1:2 keys_zone=hearth_narinfo:10m max_size=256m inactive=1h;
    '';

    virtualHosts."nix-cache.${domain}" = {
      forceSSL = true;
      enableACME = true;

      locations = operatorPages // {
        # The cache's own small files, `.ls` listings and the rest at the top: public (hearth
        # answers 404 for anything else).
        "= /nix-cache-info" = { proxyPass = upstream; extraConfig = proxied; };
        "/" = { proxyPass = upstream; extraConfig = proxied; };

        # narinfos: small and hot during a fleet upgrade. Cache hits only (hearth sends
        # Cache-Control: no-store on a 404, so a path built a moment later is never hidden).
        # Quoted: nginx reads an unquoted `{` in a regex as the start of the block.
        "~ \"^/[0-9a-df-np-sv-z]{32}\\.narinfo$\"" = {
          proxyPass = upstream;
          extraConfig = proxied + ''
            proxy_cache hearth_narinfo;
            proxy_cache_valid 200 10m;
            proxy_cache_lock on;
          '';
        };

        # NARs: stream straight through, whatever their size; keep Range working for resumes.
        "/nar/" = {
          proxyPass = upstream;
          extraConfig = proxied + ''
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            client_max_body_size 0;
            gzip off;
          '';
        };
      };
    };
  };

  networking.firewall.allowedTCPPorts = [ 80 443 ];
}
