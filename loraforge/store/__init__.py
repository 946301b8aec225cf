"""The ground floor: content hashes and the item store every per-image result lives in.

    fingerprint  xxh3-128 of bytes, files, folders and JSON (the one hash of the project)
    items        `ItemStore`: content-addressed entries, atomic writes, the `KINDS` table
    remote       the item store shared through S3 (fsspec), `open_store` from the `store` params
    fanout       per-item work spread over Prefect task runners (a Dask cluster), or run in-process

Imports nothing of loraforge but `loraforge.errors`: everything above may use it.
"""

MAY_IMPORT = ()
