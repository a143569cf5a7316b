"""Joint image/text embedders (a registry by name) and the run directory's embedding cache.

>>> from audit.embed import create_embedder, embed_table
>>> emb = create_embedder("world")                       # or "open_clip:ViT-B-32:openai"
>>> cached = embed_table(store, emb, table)              # embeddings/embedder=world/
>>> text = emb.encode_text(["a photo of a blue pullover"])

Backends import torch/open_clip/transformers only when an embedder is created.
"""

from audit.embed.base import (
    Embedder,
    create_embedder,
    embedder_slug,
    l2_normalize,
    list_embedders,
    register_embedder,
)
from audit.embed.cache import TableEmbeddings, embed_table, embedding_path, load_embeddings

__all__ = [
    "Embedder",
    "TableEmbeddings",
    "create_embedder",
    "embed_table",
    "embedder_slug",
    "embedding_path",
    "l2_normalize",
    "list_embedders",
    "load_embeddings",
    "register_embedder",
]
