"""The runtime's old address, kept working: the runners live in `theseus_deploy.runtime`.

`theseus_deploy.export.runtime.TextClassifier.load(...)` (named in earlier READMEs) is
`theseus_deploy.runtime.TextClassifier.load(...)`.
"""
from theseus_deploy.runtime import *  # noqa: F401,F403
from theseus_deploy.runtime import __all__  # noqa: F401
