import sys

from finetune_mlflow.cli import main

sys.exit(main())
