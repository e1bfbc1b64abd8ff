"""kvmsnap's test rig, kept out of the runtime package: the bundled busybox demo guest
(``builder``, ``vm``, ``disk``), the Debian test guest (``debian``), the demo run (``run``;
``python -m kvmsnap_demo demo``) and the pytest plugin (``testing``)."""
