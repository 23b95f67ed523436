from .launch import launch
from .plan import RunPlan, RunSettings
from .run import argument_parser, check_dataset, execute, plan_run, train_or_evaluate
from .trainer import RESULTS_FILE, GNTrainer, write_results
