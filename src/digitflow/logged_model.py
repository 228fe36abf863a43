"""The logged model's code, for MLflow's models-from-code: loading a logged version runs this
file and serves the model it names. The preprocessing settings come from the version's
`model_config`, the network from its artifacts (inference.DigitClassifier.load_context).

Logged this way, a version holds no pickled Python object: MLflow warns when a model is logged
as one, and can be set to refuse loading it (MLFLOW_ALLOW_PICKLE_DESERIALIZATION). dvc.yaml's
train stage does not list this file (depgraph follows imports, and nothing imports it); it
only names the class in inference.py, which the stage does list.
"""

from mlflow.models import set_model

from digitflow.inference import DigitClassifier

set_model(DigitClassifier())
