{
  description = "hearth: a Nix binary cache and NixOS build worker in one process";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAll (pkgs: {
        default = pkgs.rustPlatform.buildRustPackage {
          pname = "hearth";
          version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;
          src = pkgs.lib.cleanSource ./.;
          cargoLock.lockFile = ./Cargo.lock;
          # The test suite needs a running nix-daemon and nats-server: scripts/test runs it.
          doCheck = false;
          meta = {
            description = "Nix binary cache and NixOS build worker";
            mainProgram = "hearth";
            platforms = pkgs.lib.platforms.linux;
          };
        };
      });

      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nixos-module ];
        services.hearth.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };
    };
}
