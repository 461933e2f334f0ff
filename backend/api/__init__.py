"""The HTTP side: the Flask app (:mod:`.app`, the composition root of the API process and the Label Studio
ML protocol routes), the ``/jobs`` routes (:mod:`.jobs_routes`) and ``cosod-backend``, the command line
client of those routes (:mod:`.cli`)."""
