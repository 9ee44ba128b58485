"""The code MLflow runs to load a logged fer-exp model ("models from code": nothing is pickled).
See :mod:`fer_exp.serving`."""

import mlflow.models

from fer_exp.serving import EmotionModel

mlflow.models.set_model(EmotionModel())
