"""One module per MLproject entry point; each opens its run first (so `mlflow run` owns it), then nests."""
