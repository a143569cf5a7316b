"""The audit as stages: typed config (:mod:`.config`), inputs and injected services
(:mod:`.inputs`, :mod:`.executor`), one stage per module, and the runner that skips
current stages (:mod:`.runner`). Pure: no Ray, no Serve; ``cluster.runner`` composes it.
"""
