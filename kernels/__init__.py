"""Device kernels (Triton) with their pure-torch references. Imported as `mlmtrain.kernels`."""
