from .launch import launch
from .setup import argument_parser, setup, train_or_evaluate
from .trainer import RESULTS_FILE, GNTrainer, write_results
