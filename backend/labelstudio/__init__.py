"""Everything that speaks Label Studio's language.

- :mod:`.client`: the SDK client (task lists, cached; predictions pushed in bulk);
- :mod:`.media`: the read policy for task images (a security boundary) and the byte and pixel limits;
- :mod:`.urls`: the first check of a reference used as a URL (length, characters), origins;
- :mod:`.readahead`: images read ahead of use by the jobs;
- :mod:`.labelconfig`: which controls of a label config we fill;
- :mod:`.regions`: masks as Label Studio regions (brush RLE, polygons) and back;
- :mod:`.protocol`: webhook event names and Label Studio ids, parsed in one place.
"""
