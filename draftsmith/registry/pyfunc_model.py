"""What MLflow stores as a registered draft's model ("models from code") and runs when the version is loaded as a
pyfunc: only an import of the installed draftsmith's class (draftsmith/registry/speculative_pyfunc.py), so the code
that runs is the installed package's, never a copy kept in the registry."""

from mlflow.models import set_model

from draftsmith.registry.speculative_pyfunc import SpeculativeDraftModel

set_model(SpeculativeDraftModel())
