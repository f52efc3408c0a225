"""JSON helpers shared by the CLI, reports and model sidecars."""


def json_default(value):
    """``json.dumps(default=...)``: numpy scalars and arrays as Python values, the rest as str."""
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)
