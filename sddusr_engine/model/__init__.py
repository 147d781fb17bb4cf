"""The networks in plain PyTorch: blocks, flow, alignment, matching, TDL, low band, network."""
