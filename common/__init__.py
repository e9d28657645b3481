"""The small base every layer may use: the typed config tree, address and network matching, the
checksums and manifests of model and index folders, private folders, and starting a local Ray on
loopback."""
