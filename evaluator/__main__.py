from evaluator.cli import eval_cli

eval_cli()
