"""Small file helpers shared by the trainer and the analysis tools."""
import json
import os


def write_json_atomically(path, data, indent=2):
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename, so a process killed mid-write
    leaves the previous file (or none), never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent)
    os.replace(tmp, path)
