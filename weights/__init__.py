"""The shipped weights and their model card, installed as the data package sddusr_engine.pretrained."""
