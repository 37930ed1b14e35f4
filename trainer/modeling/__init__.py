"""The re-ID network: backbones, the domain adaptive attention module, branches and losses."""
