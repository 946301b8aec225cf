"""Images and datasets: decoding, the source folder, duplicates, buckets, the dataset measurements
the guides use, and the craft that applies them through the item store.

    images      full decode, EXIF orientation, RGB, masks (`Ingested`)
    sources     the source folder: `N_name` folders, sidecars, symlinks, rejects
    duplicates  exact duplicates by pixel hash
    buckets     aspect-ratio buckets (`BucketGrid`)
    measures    pure measurements: DSB, sharpness, dHash, tiling boxes, anti-AI cleanup, PSNR
    craft       cleanup, tiling, quality gates and DSB applied to ingested images, cached per image
    vae_check   the VAE reconstruction check (PSNR per image, worst windows)

May import `store` and `pipeline`.
"""

MAY_IMPORT = ("store", "pipeline")
