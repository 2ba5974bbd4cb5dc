"""Attribution graphs through transcoders (Ameisen et al. 2025, "Circuit Tracing"): the local replacement model
of a prompt and its linear map (``replacement``), nodes, edges, pruning and scores (``graph``), circuit-tracer's
JSON (``graph_json``) and the offline view (``view``)."""
