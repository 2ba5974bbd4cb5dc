"""Side-by-side benchmarks of the SAE train step and the activation generator (issue 6); see README.md."""
