"""Files shipped with the package (the sample pair), installed as sddusr_engine.assets."""
