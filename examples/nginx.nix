# nginx in front of hearth for nix-cache.<domain>: TLS, large bodies streamed (not buffered),
# narinfos cached briefly, NARs passed through. Import it on the build host next to the module.
{ config, ... }:

let
  domain = "home.2rjus.net";
  upstream = "http://127.0.0.1:${toString config.services.hearth.port}";
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

      locations."/" = {
        proxyPass = upstream;
        extraConfig = ''
          proxy_http_version 1.1;
          proxy_set_header Connection "";
          # hearth shares its stream bounds out by client address (trusted_proxies).
          proxy_set_header X-Forwarded-For $remote_addr;
        '';
      };

      # narinfos: small and hot during a fleet upgrade. Cache hits only (hearth sends
      # Cache-Control: no-store on a 404, so a path built a moment later is never hidden).
      locations."~ ^/[0-9a-df-np-sv-z]{32}\\.narinfo$" = {
        proxyPass = upstream;
        extraConfig = ''
          proxy_http_version 1.1;
          proxy_set_header Connection "";
          proxy_cache hearth_narinfo;
          proxy_cache_valid 200 10m;
          proxy_cache_lock on;
        '';
      };

      # NARs: stream straight through, whatever their size; keep Range working for resumes.
      locations."/nar/" = {
        proxyPass = upstream;
        extraConfig = ''
          proxy_http_version 1.1;
          proxy_set_header Connection "";
          proxy_set_header X-Forwarded-For $remote_addr;
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

  networking.firewall.allowedTCPPorts = [ 80 443 ];
}
