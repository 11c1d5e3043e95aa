# services.hearth: the hearth binary cache and NixOS build worker, and its build scheduler.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.hearth;
  toml = pkgs.formats.toml { };
  credDir = "/run/credentials/hearth.service";

  signKeyCreds = lib.imap0 (i: path: { name = "sign-key-${toString i}"; inherit path; }) cfg.signKeyPaths;

  settings = lib.recursiveUpdate cfg.settings (
    lib.optionalAttrs (cfg.signKeyPaths != [ ]) {
      sign_key_paths = map (c: "${credDir}/${c.name}") signKeyCreds;
    }
    // lib.optionalAttrs cfg.builder.enable {
      builder = {
        nats_url = cfg.builder.natsUrl;
        nkey_seed_file = "${credDir}/builder-nkey";
        build_timeout_seconds = cfg.builder.timeoutSeconds;
        gcroots_dir = "/nix/var/nix/gcroots/hearth";
        nix = "${config.nix.package}/bin/nix";
        repos = map (r: { inherit (r) name url branch; }) cfg.builder.repos;
      };
    }
  );

  # TOML has no null: unset options are left out.
  configFile = toml.generate "hearth.toml" (lib.filterAttrsRecursive (_: v: v != null) settings);

  rules = pkgs.writeText "hearth-rules.yml" (
    builtins.replaceStrings [ "100000000" ] [ (toString cfg.alerts.narBandwidthBytesPerSecond) ]
      (builtins.readFile ./monitoring/rules.yml)
  );

  repoType = lib.types.submodule {
    options = {
      name = lib.mkOption {
        type = lib.types.strMatching "[A-Za-z0-9][A-Za-z0-9._-]*";
        description = "Repo name, as in `build.<name>.<target>`.";
      };
      url = lib.mkOption {
        type = lib.types.str;
        example = "git+https://git.t-juice.club/torjus/nixos-servers.git";
        description = "Flake reference of the repo.";
      };
      branch = lib.mkOption {
        type = lib.types.str;
        default = "master";
        description = "Branch built when a request names none.";
      };
    };
  };
in
{
  options.services.hearth = {
    enable = lib.mkEnableOption "the hearth Nix binary cache (and build worker)";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The hearth package (the flake's `packages.<system>.default`).";
    };

    listenAddress = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1";
      description = "Address the cache listens on; keep it local behind nginx.";
    };

    port = lib.mkOption {
      type = lib.types.port;
      default = 5000;
      description = "TCP port of the cache.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open `port` (and the metrics port, if set) in the firewall.";
    };

    socketActivation = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Let systemd own the listening socket (hearth.socket) and start hearth on the first connection.";
    };

    signKeyPaths = lib.mkOption {
      type = lib.types.listOf lib.types.path;
      default = [ ];
      example = [ "/run/secrets/nix-cache02.home.2rjus.net-1.sec" ];
      description = ''
        Nix-format secret signing keys. They are handed to the service with systemd
        `LoadCredential`, so they may live in a secret store readable only by root.
      '';
    };

    metricsPort = lib.mkOption {
      type = lib.types.nullOr lib.types.port;
      default = 9973;
      description = "A separate `/metrics` listener on `listenAddress`, or null for none.";
    };

    addToNixAllowedUsers = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Add hearth's user to `nix.settings.allowed-users`. Needed only when that list is
        restricted: its default `*` already admits hearth. (Defining the option replaces the
        default, so list your other users too.)
      '';
    };

    settings = lib.mkOption {
      description = ''
        hearth's configuration, rendered as its TOML file (see docs/configuration.md). Keys not
        typed here are passed through as they are; unknown keys make hearth refuse to start.
      '';
      default = { };
      type = lib.types.submodule {
        freeformType = toml.type;
        options = {
          bind = lib.mkOption {
            type = lib.types.str;
            default = "${cfg.listenAddress}:${toString cfg.port}";
            defaultText = lib.literalExpression ''"''${listenAddress}:''${toString port}"'';
            description = "`host:port` or `unix:/path`.";
          };
          priority = lib.mkOption {
            type = lib.types.ints.unsigned;
            default = 30;
            description = "`Priority` in `/nix-cache-info` (lower is asked first).";
          };
          compression = {
            algorithm = lib.mkOption {
              type = lib.types.enum [ "none" "zstd" ];
              default = "none";
              description = "Serve NARs as they are, or zstd-compressed on the fly.";
            };
            level = lib.mkOption {
              type = lib.types.ints.between 1 19;
              default = 3;
              description = "zstd level.";
            };
          };
          metrics.bind = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = if cfg.metricsPort == null then null else "${cfg.listenAddress}:${toString cfg.metricsPort}";
            defaultText = lib.literalExpression ''"''${listenAddress}:''${toString metricsPort}"'';
            description = "Separate metrics listener.";
          };
        };
      };
    };

    builder = {
      enable = lib.mkEnableOption "the NATS build worker";
      natsUrl = lib.mkOption {
        type = lib.types.str;
        example = "nats://nats.home.2rjus.net:4222";
        description = "NATS server (`tls://` for TLS).";
      };
      nkeySeedFile = lib.mkOption {
        type = lib.types.path;
        description = "The builder's NKey seed, handed over with `LoadCredential`.";
      };
      repos = lib.mkOption {
        type = lib.types.listOf repoType;
        default = [ ];
        description = "Flake repos the builder accepts.";
      };
      timeoutSeconds = lib.mkOption {
        type = lib.types.ints.positive;
        default = 14400;
        description = "Timeout of one host's build.";
      };
    };

    scheduler = {
      enable = lib.mkEnableOption "a timer that builds every host of the listed repos";
      repos = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        description = "Repo names to build with `hearth build <repo> all`.";
      };
      interval = lib.mkOption {
        type = lib.types.str;
        default = "2h";
        description = "How often (systemd `OnUnitActiveSec`).";
      };
      randomizedDelay = lib.mkOption {
        type = lib.types.str;
        default = "5m";
        description = "systemd `RandomizedDelaySec`.";
      };
      natsUrl = lib.mkOption {
        type = lib.types.str;
        default = cfg.builder.natsUrl;
        defaultText = lib.literalExpression "config.services.hearth.builder.natsUrl";
        description = "NATS server for the scheduler.";
      };
      nkeySeedFile = lib.mkOption {
        type = lib.types.path;
        description = "The scheduler's own NKey seed (a deployer user: publish `build.>`, subscribe `build.responses.>`).";
      };
    };

    alerts = {
      enable = lib.mkEnableOption "hearth's alert rules in services.prometheus";
      narBandwidthBytesPerSecond = lib.mkOption {
        type = lib.types.ints.positive;
        default = 100000000;
        description = "NAR bytes per second above which the bandwidth alert fires (default: 80% of 1 Gbit/s).";
      };
    };
  };

  config = lib.mkMerge [
    (lib.mkIf cfg.enable {
      users.users.hearth = {
        isSystemUser = true;
        group = "hearth";
        description = "hearth binary cache";
      };
      users.groups.hearth = { };

      nix.settings.allowed-users = lib.mkIf cfg.addToNixAllowedUsers [ "hearth" ];

      systemd.tmpfiles.rules = lib.optional cfg.builder.enable "d /nix/var/nix/gcroots/hearth 0755 hearth hearth -";

      networking.firewall.allowedTCPPorts =
        lib.optionals cfg.openFirewall ([ cfg.port ] ++ lib.optional (cfg.metricsPort != null) cfg.metricsPort);

      services.prometheus.ruleFiles = lib.mkIf cfg.alerts.enable [ rules ];

      systemd.sockets.hearth = lib.mkIf cfg.socketActivation {
        wantedBy = [ "sockets.target" ];
        listenStreams = [ "${cfg.listenAddress}:${toString cfg.port}" ];
      };

      systemd.services.hearth = {
        description = "hearth Nix binary cache";
        wantedBy = [ "multi-user.target" ];
        after = [ "network-online.target" "nix-daemon.socket" ];
        wants = [ "network-online.target" ];
        requires = lib.optional cfg.socketActivation "hearth.socket";
        path = [ config.nix.package pkgs.git ];
        environment.HEARTH_LOG = "info";
        serviceConfig = {
          Type = "notify";
          ExecStart = "${cfg.package}/bin/hearth serve --config ${configFile}";
          Restart = "on-failure";
          RestartSec = 5;
          User = "hearth";
          Group = "hearth";
          LoadCredential =
            map (c: "${c.name}:${c.path}") signKeyCreds
            ++ lib.optional cfg.builder.enable "builder-nkey:${cfg.builder.nkeySeedFile}";
          # Builds run in the daemon; hearth itself reads the store and writes only its GC roots.
          ProtectSystem = "strict";
          ReadWritePaths = lib.optional cfg.builder.enable "/nix/var/nix/gcroots/hearth";
          StateDirectory = "hearth";
          CacheDirectory = "hearth";
          Environment = [ "HOME=/var/lib/hearth" "XDG_CACHE_HOME=/var/cache/hearth" ];
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" "~@privileged" ];
          UMask = "0077";
          LimitNOFILE = 65536;
        };
      };
    })

    (lib.mkIf cfg.scheduler.enable {
      systemd.services.hearth-scheduled-build = {
        description = "Build every host of ${lib.concatStringsSep ", " cfg.scheduler.repos} with hearth";
        after = [ "network-online.target" ];
        wants = [ "network-online.target" ];
        serviceConfig = {
          Type = "oneshot";
          DynamicUser = true;
          LoadCredential = [ "nkey:${cfg.scheduler.nkeySeedFile}" ];
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          CapabilityBoundingSet = "";
        };
        # Every repo is built even if an earlier one fails; the unit fails if any did.
        script = ''
          status=0
          for repo in ${lib.escapeShellArgs cfg.scheduler.repos}; do
            ${cfg.package}/bin/hearth build "$repo" all \
              --nats-url ${lib.escapeShellArg cfg.scheduler.natsUrl} \
              --nkey-seed-file "$CREDENTIALS_DIRECTORY/nkey" || status=$?
          done
          exit $status
        '';
      };
      systemd.timers.hearth-scheduled-build = {
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnBootSec = "10m";
          OnUnitActiveSec = cfg.scheduler.interval;
          RandomizedDelaySec = cfg.scheduler.randomizedDelay;
          Persistent = true;
        };
      };
    })
  ];
}
