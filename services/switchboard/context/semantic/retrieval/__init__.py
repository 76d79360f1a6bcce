"""Search by words and by meaning: the filter grammar, rank fusion, and the reads a
search makes."""
