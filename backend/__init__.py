"""Label Studio ML backend for co-salient object detection.

Sub-packages in layers; each imports only from the layers below it (``tests/test_backend_layout.py``)::

    api/          the Flask app (composition root), routes, the cosod-backend CLI
      jobs/       the queue (RQ or in-process), pre-annotation and fine-tune jobs, workers, GPU slots
        prediction/   the protocol adapter (CoSODModel), group cache, pipeline loading, project state
          learning/   corrections, their SQLite store, model versions, the fine-tune itself
            labelstudio/  SDK client, the image read policy, read-ahead, label config, regions, events and ids
              grouping    tasks and group keys
                settings, errors, metrics

The pipeline itself is the ``cosod`` library, which imports nothing from here.
"""
