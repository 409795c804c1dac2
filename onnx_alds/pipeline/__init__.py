"""The stages of one rewrite in order (:mod:`.stages`), the typed results they pass on
(:mod:`.attempt`) and the measured choice between candidate plans (:mod:`.candidates`)."""
