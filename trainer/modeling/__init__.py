"""The re-ID networks: backbones, the domain adaptive attention module, branches and losses.

| module             | what                                                                          |
|--------------------|-------------------------------------------------------------------------------|
| `backbones`        | ResNet / MobileNetV2 trunks with offline ImageNet weights, `GapEmbedder`       |
| `attention`        | DAAM / DAAL attention splits (F_sh, F_sp)                                      |
| `network`, `losses`| the DAAM / DAAL network and Eq. 5-12                                           |
| `adfl`             | ADFL's type I attention after stage 3 (`build_trunk`, for any method), AF3 branch, `AdflNet` |
| `arn`              | ARN's encoders, decoder and `ArnNet`                                           |
| `embedding_losses` | batch-hard triplet, contrastive, difference (orthogonality), MMD               |
"""
