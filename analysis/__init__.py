"""analysis: layer-importance heatmaps, gate trajectories and comparison reports."""
