import sys

from finetune_mlflow.cli import run

sys.exit(run())
