"""Learning from corrections.

- :mod:`.corrections`: a webhook event's annotation -> a stored correction (or a deletion);
- :mod:`.store`: the SQLite file under ``MODEL_DIR`` (corrections, versions, the change counter);
- :mod:`.versions`: a project's model versions, the active one, and what serves a project;
- :mod:`.finetune`: a fine-tune from corrections to a candidate promoted only on evidence.
"""
