"""Label Studio ML backend for co-salient object detection (see ``backend.app.create_app``)."""
