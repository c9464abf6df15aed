"""Device meshes, logical-axis sharding rules, and multi-host set-up."""
