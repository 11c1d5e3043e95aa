# Evaluates nixos-module/ with nixpkgs' real module system (lib.evalModules from
# ../shared/nixpkgs-lib) and renders what NixOS would make of it, for tests/nixos.rs.
#
# There is no NixOS here (Debian's Nix 2.8 cannot evaluate current nixpkgs), so the NixOS options
# the module sets are declared below with the types NixOS gives them, and units are rendered the
# way NixOS's systemd library renders them (`Key=value` lines, one line per list element). `pkgs`
# holds only what the module uses; its TOML generator writes real TOML into the store so the test
# can run it through `hearth check-config`.
{ lib, configuration, module ? ../../nixos-module }:
let
  inherit (lib) mkOption types;

  fakePkg = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };

  # TOML as pkgs.formats.toml writes it: scalars, arrays, tables and arrays of tables.
  tomlValue = v:
    if builtins.isString v then builtins.toJSON v
    else if builtins.isBool v then (if v then "true" else "false")
    else if builtins.isInt v || builtins.isFloat v then toString v
    else if builtins.isList v then "[ ${lib.concatMapStringsSep ", " tomlValue v} ]"
    else throw "tomlValue: cannot render ${builtins.typeOf v}";
  isTable = v: builtins.isAttrs v;
  isTableArray = v: builtins.isList v && v != [ ] && builtins.all builtins.isAttrs v;
  toTOML = prefix: attrs:
    let
      names = builtins.attrNames attrs;
      plain = builtins.filter (n: !(isTable attrs.${n}) && !(isTableArray attrs.${n})) names;
      tables = builtins.filter (n: isTable attrs.${n}) names;
      arrays = builtins.filter (n: isTableArray attrs.${n}) names;
      key = n: if prefix == "" then n else "${prefix}.${n}";
    in
    lib.concatMapStrings (n: "${n} = ${tomlValue attrs.${n}}\n") plain
    + lib.concatMapStrings (n: "\n[${key n}]\n" + toTOML (key n) attrs.${n}) tables
    + lib.concatMapStrings (n: lib.concatMapStrings (t: "\n[[${key n}]]\n" + toTOML (key n) t) attrs.${n}) arrays;

  tomlType =
    let
      valueType = types.nullOr (types.oneOf [
        types.bool types.int types.float types.str types.path (types.attrsOf valueType) (types.listOf valueType)
      ]) // { description = "TOML value"; };
    in
    types.attrsOf valueType;

  pkgs = {
    formats.toml = { }: {
      type = tomlType;
      generate = name: value: builtins.toFile name (toTOML "" value);
    };
    writeText = name: text: builtins.toFile name text;
    git = fakePkg "git";
    openssh = fakePkg "openssh";
    coreutils = fakePkg "coreutils";
    stdenv.hostPlatform.system = "x86_64-linux";
  };

  # NixOS's `unitOption`: a scalar or a list of them.
  unitScalar = types.oneOf [ types.bool types.int types.str types.path ];
  unitOption = types.either unitScalar (types.listOf unitScalar);
  unitNames = types.listOf types.str;
  commonUnit = {
    description = mkOption { type = types.str; default = ""; };
    wantedBy = mkOption { type = unitNames; default = [ ]; };
    after = mkOption { type = unitNames; default = [ ]; };
    wants = mkOption { type = unitNames; default = [ ]; };
    requires = mkOption { type = unitNames; default = [ ]; };
    unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
  };
  serviceOpts = {
    options = commonUnit // {
      path = mkOption { type = types.listOf (types.either types.package types.str); default = [ ]; };
      environment = mkOption { type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ])); default = { }; };
      serviceConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      script = mkOption { type = types.lines; default = ""; };
    };
  };
  socketOpts = { options = commonUnit // { listenStreams = mkOption { type = types.listOf types.str; default = [ ]; }; }; };
  timerOpts = { options = commonUnit // { timerConfig = mkOption { type = types.attrsOf unitOption; default = { }; }; }; };

  nixosOptions = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      users.users = mkOption {
        type = types.attrsOf (types.submodule {
          freeformType = types.attrsOf types.anything;
          options.isSystemUser = mkOption { type = types.bool; default = false; };
          options.group = mkOption { type = types.str; default = ""; };
        });
        default = { };
      };
      users.groups = mkOption { type = types.attrsOf (types.submodule { freeformType = types.attrsOf types.anything; }); default = { }; };
      nix.package = mkOption { type = types.package; default = fakePkg "nix"; };
      nix.settings = mkOption {
        type = types.submodule {
          freeformType = types.attrsOf types.anything;
          options.allowed-users = mkOption { type = types.listOf types.str; default = [ "*" ]; };
        };
        default = { };
      };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      services.prometheus.ruleFiles = mkOption { type = types.listOf types.path; default = [ ]; };
      systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
      systemd.services = mkOption { type = types.attrsOf (types.submodule serviceOpts); default = { }; };
      systemd.sockets = mkOption { type = types.attrsOf (types.submodule socketOpts); default = { }; };
      systemd.timers = mkOption { type = types.attrsOf (types.submodule timerOpts); default = { }; };
    };
  };

  eval = lib.evalModules {
    modules = [ nixosOptions module configuration ];
    specialArgs = { inherit pkgs; };
  };
  config = eval.config;

  # As NixOS's systemd library: one `Key=value` line per value, lists as repeated keys.
  line = key: v: "${key}=${if builtins.isBool v then (if v then "true" else "false") else toString v}\n";
  section = attrs: lib.concatStrings (lib.mapAttrsToList
    (k: v: if builtins.isList v then lib.concatMapStrings (line k) v else line k v) attrs);
  unitSection = u:
    "[Unit]\n" + lib.optionalString (u.description != "") "Description=${u.description}\n"
    + lib.concatMapStrings (k: lib.optionalString (u.${k} != [ ]) "${lib.toUpper (builtins.substring 0 1 k)}${builtins.substring 1 100 k}=${toString u.${k}}\n") [ "after" "wants" "requires" ]
    + section u.unitConfig;
  renderService = name: s:
    let
      env = lib.filterAttrs (_: v: v != null) s.environment
        // lib.optionalAttrs (s.path != [ ]) { PATH = lib.concatMapStringsSep ":" (p: "${p}/bin") s.path; };
      script = lib.optionalAttrs (s.script != "") { ExecStart = builtins.toFile "${name}-start" s.script; };
    in
    unitSection s + "\n[Service]\n"
    + lib.concatStrings (lib.mapAttrsToList (k: v: "Environment=\"${k}=${toString v}\"\n") env)
    + section (s.serviceConfig // script);
  render = kind: body: name: u: unitSection u + "\n[${kind}]\n" + body u;
in
{
  services = lib.mapAttrs renderService config.systemd.services;
  sockets = lib.mapAttrs (render "Socket" (u: lib.concatMapStrings (line "ListenStream") u.listenStreams)) config.systemd.sockets;
  timers = lib.mapAttrs (render "Timer" (u: section u.timerConfig)) config.systemd.timers;
  wantedBy = lib.mapAttrs (_: u: u.wantedBy) (config.systemd.services // lib.mapAttrs' (n: v: lib.nameValuePair "${n}.socket" v) config.systemd.sockets // lib.mapAttrs' (n: v: lib.nameValuePair "${n}.timer" v) config.systemd.timers);
  tmpfiles = config.systemd.tmpfiles.rules;
  ruleFiles = map (f: baseNameOf (toString f)) config.services.prometheus.ruleFiles;
  firewall = config.networking.firewall.allowedTCPPorts;
  allowedUsers = config.nix.settings.allowed-users;
  users = builtins.attrNames config.users.users;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  warnings = config.warnings;
  # The TOML file hearth is started with, as text.
  toml =
    let exec = config.systemd.services.hearth.serviceConfig.ExecStart or "";
    in if exec == "" then null else builtins.readFile (lib.last (lib.splitString " " exec));
}
