"""Snapshot and restore (eager, or lazy with userfaultfd), live migration, and the control
channel that drives them from outside the VMM process (docs/persist.md).

    state       the vCPU, VM and VMM state besides RAM, as a JSON-able dict
    memfile     guest RAM as a sparse file with a checksummed index
    format      the snapshot directory: files, checksums, versions, atomic replacement
    snapshot    take() and restore() a whole machine
    lazy, uffd  lazy restore: a page-fault handler process behind userfaultfd
    session     a machine run in one thread, paused and inspected from others
    control     the control operations and their unix-socket channel (kvmpy ctl)
    migration   pre-copy live migration over TCP
    guest       the hashchain example guest's parameters (tests, benchmarks)
"""
