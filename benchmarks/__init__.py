"""Side-by-side benchmarks of the SAE train step and the activation generator; see README.md."""
