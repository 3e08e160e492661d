"""The `netdsl` command (`main.py`) and its views: `run`'s front, the info table, the picture."""
