# services.hearth: the hearth binary cache and NixOS build worker, and its build scheduler.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.hearth;
  toml = pkgs.formats.toml { };
  credDir = "/run/credentials/hearth.service";
  gcrootsDir = "/nix/var/nix/gcroots/hearth";

  # A secret's path: an absolute path string outside the store. A path literal (`./cache.sec`)
  # would be copied into the world-readable /nix/store, so it is refused.
  secretPath = lib.types.externalPath or (lib.types.addCheck lib.types.str
    (s: lib.hasPrefix "/" s && !lib.hasPrefix "${builtins.storeDir}/" s) // {
    description = "absolute path not in the Nix store";
  });

  # `host:port`, with an IPv6 literal in brackets, as both systemd and hearth want it.
  hostPort = addr: port: if lib.hasInfix ":" addr then "[${addr}]:${toString port}" else "${addr}:${toString port}";
  # The sandbox both units share: no privileges, capabilities or devices, a private /tmp, the
  # kernel and other namespaces out of reach, IP and unix sockets only.
  sandbox = {
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
    UMask = "0077";
  };

  isLoopback = addr: addr == "localhost" || addr == "::1" || lib.hasPrefix "127." addr;

  signKeyCreds = lib.imap0 (i: path: { name = "sign-key-${toString i}"; inherit path; }) cfg.signKeyPaths;

  # The TOML settings, with credentials at `credDir` (each unit gets its own directory).
  settingsFor = credDir: lib.recursiveUpdate cfg.settings (
    lib.optionalAttrs (cfg.signKeyPaths != [ ]) {
      sign_key_paths = map (c: "${credDir}/${c.name}") signKeyCreds;
    }
    // lib.optionalAttrs cfg.builder.enable {
      builder = {
        nats_url = cfg.builder.natsUrl;
        nkey_seed_file = "${credDir}/builder-nkey";
        build_timeout_seconds = cfg.builder.timeoutSeconds;
        keep_generations = cfg.builder.keepGenerations;
        eval_workers = cfg.builder.evalWorkers;
        queue = cfg.builder.queue;
        gcroots_dir = gcrootsDir;
        nix = "${config.nix.package}/bin/nix";
        repos = map (r: { inherit (r) name url branch; }) cfg.builder.repos;
      };
    }
    // lib.optionalAttrs cfg.fleet.enable {
      fleet = {
        nats_url = cfg.fleet.natsUrl;
        nkey_seed_file = "${credDir}/fleet-nkey";
      };
    }
    // lib.optionalAttrs cfg.bucket.enable {
      bucket = {
        inherit (cfg.bucket) url;
        access_key_id_file = "${credDir}/s3-access-key-id";
        secret_access_key_file = "${credDir}/s3-secret-access-key";
        read_through = cfg.bucket.readThrough;
        public_url = cfg.bucket.publicUrl;
      };
    }
  );
  settings = settingsFor credDir;

  # TOML has no null: unset options are left out.
  configFileFor = name: settings: toml.generate name (lib.filterAttrsRecursive (_: v: v != null) settings);
  configFile = configFileFor "hearth.toml" settings;

  # Every secret the service reads, as systemd hands them over.
  credentials =
    map (c: "${c.name}:${c.path}") signKeyCreds
    ++ lib.optional cfg.builder.enable "builder-nkey:${cfg.builder.nkeySeedFile}"
    ++ lib.optional (cfg.builder.enable && cfg.builder.sshKeyFile != null) "builder-ssh-key:${cfg.builder.sshKeyFile}"
    ++ lib.optional cfg.fleet.enable "fleet-nkey:${cfg.fleet.nkeySeedFile}"
    ++ lib.optionals cfg.bucket.enable [
      "s3-access-key-id:${cfg.bucket.accessKeyIdFile}"
      "s3-secret-access-key:${cfg.bucket.secretAccessKeyFile}"
    ];

  rules = pkgs.writeText "hearth-rules.yml" (
    builtins.replaceStrings [ "100000000" ] [ (toString cfg.alerts.narBandwidthBytesPerSecond) ]
      (builtins.readFile ./monitoring/rules.yml)
  );
  # Only where the builder runs: elsewhere its metrics are absent by design.
  builderRules = pkgs.writeText "hearth-builder-rules.yml" (builtins.readFile ./monitoring/builder-rules.yml);

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
      default = throw ''
        services.hearth.package has no value: set it to hearth's package, e.g.
        `services.hearth.package = inputs.hearth.packages.''${pkgs.stdenv.hostPlatform.system}.default;`,
        or import the flake's `nixosModules.default`, which sets it (importing `nixos-module/`
        directly does not).
      '';
      defaultText = lib.literalMD "the flake's `packages.<system>.default` with `nixosModules.default`; none when `nixos-module/` is imported directly";
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
      type = lib.types.listOf secretPath;
      default = [ ];
      example = [ "/run/secrets/nix-cache02.home.2rjus.net-1.sec" ];
      description = ''
        Nix-format secret signing keys, as absolute path strings outside the store (a path
        literal such as `./cache.sec` is refused: Nix would copy the secret into the
        world-readable /nix/store). They are handed to the service with systemd
        `LoadCredential`, so they may live in a secret store readable only by root.
      '';
    };

    metricsPort = lib.mkOption {
      type = lib.types.nullOr lib.types.port;
      default = 9973;
      description = "A separate `/metrics` listener on `metricsListenAddress`, or null for none.";
    };

    metricsListenAddress = lib.mkOption {
      type = lib.types.str;
      default = cfg.listenAddress;
      defaultText = lib.literalExpression "config.services.hearth.listenAddress";
      example = "0.0.0.0";
      description = ''
        Address of the separate `/metrics` listener. A Prometheus on another host needs an
        address it can reach (and `openFirewall`, or a firewall rule of your own for
        `metricsPort`), while the cache itself stays on loopback behind nginx.
      '';
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
            default = hostPort cfg.listenAddress cfg.port;
            defaultText = lib.literalMD "`listenAddress:port` (`[addr]:port` for IPv6)";
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
              default = 1;
              description = "zstd level (1: fastest on the fly, chosen by measurement; see docs/performance.md).";
            };
          };
          metrics.bind = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = if cfg.metricsPort == null then null else hostPort cfg.metricsListenAddress cfg.metricsPort;
            defaultText = lib.literalMD "`metricsListenAddress:metricsPort` (`[addr]:port` for IPv6)";
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
        type = secretPath;
        description = "The builder's NKey seed (an absolute path string outside the store), handed over with `LoadCredential`.";
      };
      sshKeyFile = lib.mkOption {
        type = lib.types.nullOr secretPath;
        default = null;
        example = "/run/secrets/hearth-deploy-key";
        description = ''
          A private SSH key (a deploy key with read access) for `git+ssh://` repos, as an
          absolute path string outside the store, handed over with `LoadCredential`. The `nix`
          and `git` commands hearth runs as its own user fetch the repos (not the daemon), with
          this key and `StrictHostKeyChecking=accept-new` against `/var/lib/hearth/.ssh/known_hosts`.
        '';
      };
      repos = lib.mkOption {
        type = lib.types.listOf repoType;
        default = [ ];
        description = "Flake repos the builder accepts.";
      };
      timeoutSeconds = lib.mkOption {
        type = lib.types.ints.positive;
        default = 14400;
        description = "Timeout of one host's evaluation, and of the build of all hosts of one request.";
      };
      keepGenerations = lib.mkOption {
        type = lib.types.ints.between 1 1000;
        default = 3;
        description = "Good systems kept per host as GC roots (the newest included), so rollbacks are served from the cache.";
      };
      queue = lib.mkOption {
        type = lib.types.enum [ "core" "jetstream" ];
        default = "core";
        description = ''
          Where build requests come from: "core" (a NATS queue group; a request lives in one
          builder's memory) or "jetstream" (a durable work queue that every builder shares and
          that survives a crash, and one fleet record for all builders in a key-value bucket).
          The builder's NATS user then needs the JetStream API (see docs/protocol.md).
        '';
      };
      evalWorkers = lib.mkOption {
        type = lib.types.nullOr (lib.types.ints.between 1 256);
        default = null;
        example = 4;
        description = ''
          Nix evaluator processes at once when a request builds several hosts. Unset: half the
          cores (at least 2 where there are 2). A NixOS evaluation takes one core and 1–2 GiB, so
          the build host needs about evalWorkers × 2 GiB free while a fleet evaluates; 1 keeps the
          footprint of one host at a time.
        '';
      };
    };

    bucket = {
      enable = lib.mkEnableOption "pushing every built system to an S3 bucket (e.g. Garage) in Nix's binary-cache layout";
      url = lib.mkOption {
        type = lib.types.strMatching "s3://.*";
        example = "s3://nix-cache?endpoint=http://garage.home.2rjus.net:3900&region=garage";
        description = "The bucket, in Nix's `s3://` URL form (`endpoint` is required).";
      };
      accessKeyIdFile = lib.mkOption {
        type = secretPath;
        example = "/run/secrets/hearth-s3-key-id";
        description = "File holding the S3 access key id, handed over with `LoadCredential`.";
      };
      secretAccessKeyFile = lib.mkOption {
        type = secretPath;
        example = "/run/secrets/hearth-s3-secret";
        description = "File holding the S3 secret access key, handed over with `LoadCredential`.";
      };
      readThrough = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Answer paths that are not in the local store from the bucket (every builder's builds from one cache).";
      };
      publicUrl = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "http://nix-cache.web.garage.home.2rjus.net:3902";
        description = "With `readThrough`: where clients fetch the bucket's objects themselves; NARs not held locally are then redirects there.";
      };
      gc = {
        enable = lib.mkEnableOption "a timer that deletes what no kept generation of any host needs from the bucket (`hearth bucket gc`)";
        schedule = lib.mkOption {
          type = lib.types.str;
          default = "weekly";
          description = "When (systemd `OnCalendar`); a run missed while the host was down runs at boot.";
        };
        grace = lib.mkOption {
          type = lib.types.strMatching "[0-9]+[smhd]";
          default = "1d";
          description = "Objects written within this long are kept whatever they are (uploads in progress).";
        };
        oncePer = lib.mkOption {
          type = lib.types.nullOr (lib.types.strMatching "[0-9]+[smhd]");
          default = "1d";
          description = "Collect only if no collection of the bucket ended within this long and none runs (`--once-per`): the timer may run on every builder, and the fleet's bucket is collected once a period. `null`: every run collects.";
        };
      };
    };

    fleet = {
      enable = lib.mkEnableOption "the fleet's shared record (JetStream) on the page of a hearth without a builder, such as a read-through cache (`[fleet]`)";
      natsUrl = lib.mkOption {
        type = lib.types.str;
        example = "nats://nats.home.2rjus.net:4222";
        description = "NATS server with the builders' JetStream record.";
      };
      nkeySeedFile = lib.mkOption {
        type = secretPath;
        description = "A reader's NKey seed: it may read the record and the build consumer's state, never write (docs/fleet.md lists its permissions).";
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
        type = lib.types.strMatching "[0-9]+[smhd]";
        default = "2h";
        description = "How often (systemd `OnUnitActiveSec`), and the `--once-per` of each build: a commit built within it (by any builder's scheduler) is answered from the record, so a scheduler on every builder builds once a period for the fleet.";
      };
      randomizedDelay = lib.mkOption {
        type = lib.types.str;
        default = "5m";
        description = "systemd `RandomizedDelaySec`.";
      };
      natsUrl = lib.mkOption {
        type = lib.types.str;
        default =
          if cfg.builder.enable then cfg.builder.natsUrl
          else throw "services.hearth.scheduler.natsUrl has no value: set it (it defaults to services.hearth.builder.natsUrl only where the builder is enabled)";
        defaultText = lib.literalExpression "config.services.hearth.builder.natsUrl";
        description = "NATS server for the scheduler.";
      };
      nkeySeedFile = lib.mkOption {
        type = secretPath;
        description = "The scheduler's own NKey seed (a deployer user: publish `build.>` but never `build.responses.>`, subscribe `build.responses.>`).";
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
      assertions = [
        {
          assertion = !cfg.bucket.gc.enable || (cfg.bucket.enable && cfg.builder.enable);
          message = "services.hearth.bucket.gc.enable needs services.hearth.bucket.enable and services.hearth.builder.enable: the builder's fleet record says what the bucket must keep.";
        }
        {
          assertion = cfg.bucket.publicUrl == null || cfg.bucket.readThrough;
          message = "services.hearth.bucket.publicUrl only means something with services.hearth.bucket.readThrough = true.";
        }
        {
          assertion = !(cfg.fleet.enable && cfg.builder.enable);
          message = "services.hearth.fleet is for a hearth without a builder: a builder (queue = \"jetstream\") shows the shared record itself.";
        }
        {
          assertion = !cfg.builder.enable || cfg.builder.repos != [ ];
          message = "services.hearth.builder.enable is set but services.hearth.builder.repos is empty: hearth would refuse to start. List the flake repos to build.";
        }
      ];
      warnings = lib.optional (cfg.openFirewall && isLoopback cfg.listenAddress)
        "services.hearth.openFirewall opens port ${toString cfg.port}, but hearth listens on ${cfg.listenAddress} only: nothing outside reaches it. Set services.hearth.listenAddress (e.g. \"0.0.0.0\"), or leave the firewall closed behind nginx.";

      users.users.hearth = {
        isSystemUser = true;
        group = "hearth";
        description = "hearth binary cache";
      };
      users.groups.hearth = { };

      nix.settings.allowed-users = lib.mkIf cfg.addToNixAllowedUsers [ "hearth" ];

      systemd.tmpfiles.rules = lib.optional cfg.builder.enable "d ${gcrootsDir} 0755 hearth hearth -";

      networking.firewall.allowedTCPPorts =
        lib.optionals cfg.openFirewall ([ cfg.port ] ++ lib.optional (cfg.metricsPort != null) cfg.metricsPort);

      services.prometheus.ruleFiles = lib.mkIf cfg.alerts.enable ([ rules ] ++ lib.optional cfg.builder.enable builderRules);

      systemd.sockets.hearth = lib.mkIf cfg.socketActivation {
        wantedBy = [ "sockets.target" ];
        listenStreams = [ (hostPort cfg.listenAddress cfg.port) ];
      };

      systemd.services.hearth = {
        description = "hearth Nix binary cache";
        # With socket activation the socket starts hearth on the first connection.
        wantedBy = lib.optional (!cfg.socketActivation) "multi-user.target";
        after = [ "network-online.target" "nix-daemon.socket" ];
        wants = [ "network-online.target" ];
        requires = lib.optional cfg.socketActivation "hearth.socket";
        # git+ssh:// repos are fetched by these commands, as hearth.
        path = [ config.nix.package pkgs.git pkgs.openssh ];
        environment.HEARTH_LOG = "info";
        serviceConfig = sandbox // {
          Type = "notify";
          # The GC-root directory exists before the sandbox is set up, even on the first switch
          # before tmpfiles ran ("+": as root, outside the sandbox).
          ExecStartPre = lib.optional cfg.builder.enable
            "+${pkgs.coreutils}/bin/install -d -m 0755 -o hearth -g hearth ${gcrootsDir}";
          ExecStart = "${cfg.package}/bin/hearth serve --config ${configFile}";
          Restart = "on-failure";
          RestartSec = 5;
          # A process the kernel's OOM killer takes (an evaluator: hearth raises its children's
          # oom_score_adj so they go first) fails its build; the cache and the other builds go on.
          OOMPolicy = "continue";
          # After SIGTERM a running build gets shutdown_grace_seconds, then up to 25 s to be
          # stopped and reported interrupted: systemd must not kill hearth before that.
          TimeoutStopSec = (settings.shutdown_grace_seconds or 30) + 40;
          User = "hearth";
          Group = "hearth";
          LoadCredential = credentials;
          # Builds run in the daemon; hearth itself reads the store and writes only its GC roots.
          ProtectSystem = "strict";
          ReadWritePaths = lib.optional cfg.builder.enable "-${gcrootsDir}";
          StateDirectory = "hearth";
          CacheDirectory = "hearth";
          Environment = [ "HOME=/var/lib/hearth" "XDG_CACHE_HOME=/var/cache/hearth" ]
            ++ lib.optional (cfg.builder.enable && cfg.builder.sshKeyFile != null)
              "GIT_SSH_COMMAND=ssh -i %d/builder-ssh-key -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=/var/lib/hearth/.ssh/known_hosts";
          SystemCallFilter = [ "@system-service" "~@privileged" ];
          LimitNOFILE = 65536;
        };
      };
    })

    (lib.mkIf (cfg.enable && cfg.bucket.gc.enable) {
      systemd.services.hearth-bucket-gc = {
        description = "Delete what no kept generation needs from hearth's S3 bucket";
        after = [ "network-online.target" "hearth.service" ];
        wants = [ "network-online.target" ];
        serviceConfig = sandbox // {
          Type = "oneshot";
          # hearth's user: it reads the fleet record in hearth's state directory (or, with the
          # JetStream queue, the shared one with the builder's NKey).
          User = "hearth";
          Group = "hearth";
          LoadCredential = credentials;
          ExecStart = "${cfg.package}/bin/hearth bucket gc --config ${
            configFileFor "hearth-bucket-gc.toml" (settingsFor "/run/credentials/hearth-bucket-gc.service")
          } --grace ${cfg.bucket.gc.grace}${lib.optionalString (cfg.bucket.gc.oncePer != null) " --once-per ${cfg.bucket.gc.oncePer}"}";
          ProtectSystem = "strict";
          StateDirectory = "hearth";
          SystemCallFilter = [ "@system-service" "~@privileged" ];
        };
      };
      systemd.timers.hearth-bucket-gc = {
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnCalendar = cfg.bucket.gc.schedule;
          Persistent = true;
          RandomizedDelaySec = "1h";
        };
      };
    })

    (lib.mkIf cfg.scheduler.enable {
      systemd.services.hearth-scheduled-build = {
        description = "Build every host of ${lib.concatStringsSep ", " cfg.scheduler.repos} with hearth";
        after = [ "network-online.target" ];
        wants = [ "network-online.target" ];
        serviceConfig = sandbox // {
          Type = "oneshot";
          DynamicUser = true;
          LoadCredential = [ "nkey:${cfg.scheduler.nkeySeedFile}" ];
          # A NATS client only: as tightly sandboxed as hearth itself.
          ProtectSystem = "strict";
          ProtectProc = "invisible";
          SystemCallFilter = [ "@system-service" "~@privileged" "~@resources" ];
        };
        # Every repo is built even if an earlier one fails; the unit fails if any did.
        script = ''
          status=0
          for repo in ${lib.escapeShellArgs cfg.scheduler.repos}; do
            ${cfg.package}/bin/hearth build "$repo" all --once-per ${cfg.scheduler.interval} \
              --nats-url ${lib.escapeShellArg cfg.scheduler.natsUrl} \
              --nkey-seed-file "$CREDENTIALS_DIRECTORY/nkey" || status=$?
          done
          exit $status
        '';
      };
      systemd.timers.hearth-scheduled-build = {
        wantedBy = [ "timers.target" ];
        # Interval-based (not a calendar): a run missed while the host was down is caught up by
        # OnBootSec, so Persistent= (which only acts on OnCalendar=) is not set.
        timerConfig = {
          OnBootSec = "10m";
          OnUnitActiveSec = cfg.scheduler.interval;
          RandomizedDelaySec = cfg.scheduler.randomizedDelay;
        };
      };
    })
  ];
}
