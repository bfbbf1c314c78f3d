"""How ditq calls a user's model on one user-given input, shared by calibration (convert) and autoquant (nn),
which may not import each other."""


def call_model(model, inp):
    """``model(**inp)`` for a dict, ``model(*inp)`` for a tuple or list, else ``model(inp)``."""
    if isinstance(inp, dict):
        return model(**inp)
    if isinstance(inp, (tuple, list)):
        return model(*inp)
    return model(inp)
