"""The trainer's data layer: datasets, MOT crops, harvested target crops, transforms and PK batches.

| module          | what                                                                        |
|-----------------|-----------------------------------------------------------------------------|
| `samples`       | `Sample` (path, pid, camid, frame), `ReidSplit`, `TargetSet`, relabelling      |
| `datasets`      | Market-1501, DukeMTMC-reID, MSMT17, CUHK03-np, folder-per-identity; `build_dataset` |
| `mot`           | MOTChallenge sequence → cached identity crops; `time_split` for one-camera evaluation |
| `harvest`       | the unlabelled target: the edge node's harvest folder or any image folder     |
| `transforms`    | training augmentation (flip, pad + crop, random erasing) and the test transform |
| `loader`        | `ImageDataset`, `filter_readable`, `PKSampler`, `make_train_loader` / `make_eval_loader` |
| `build`         | a run's data from its config: `load_train_data(cfg)`, `labelled_split(kind, root, cache_dir)` |

    from crossview.trainer.data.datasets import build_dataset
    from crossview.trainer.data.loader import make_train_loader
    from crossview.trainer.data.transforms import build_transforms

    split = build_dataset("market1501", "data/Market-1501-v15.09.15")
    loader = make_train_loader(split.train, build_transforms((256, 128), train=True), p=16, k=4)
"""
