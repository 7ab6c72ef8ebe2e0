"""Audio → content embeddings, and the label transforms APEX trains on (installed as ``apex_rank.features``)."""
