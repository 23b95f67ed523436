from .setup import INPUT_ERRORS, argument_parser, setup, train_or_evaluate
from .trainer import RESULTS_FILE, GNTrainer, write_results
