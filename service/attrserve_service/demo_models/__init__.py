import pathlib

DEMO_MODEL_REPOSITORY = pathlib.Path(__file__).parent
