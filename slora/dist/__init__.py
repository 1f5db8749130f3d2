"""torchrun: everything that changes when several processes run one job. With one process every function here is
the identity, so the layers below never see a process group.

    process_group.py  torchrun's environment, collectives (JSON, never pickles), shards, failure on any rank
    data_parallel.py  DDP or FSDP2 wrapping, each rank's rows, gradient sync, sharded evaluation
    sharded_load.py   --fsdp: a meta skeleton sharded with FSDP2, each rank reading only its rows of the files
    calibration.py    the method's calibration group: Hessian sums over ranks, statistics gathered, ranks broadcast
"""
