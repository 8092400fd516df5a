"""The run file and the results file (HDF5): the only package in lossatlas that imports h5py.

Modules: ``runfile`` (``RunWriter``, ``RunReader``, ``Checkpoint``, ``open_run``), ``results``
(``ResultsStore``), ``recovery`` (the SWMR protocol and the reading of a file whose writer died),
``locks`` (the ``.lock`` sidecars), ``integrity`` (checksums, a full disk, atomic publication of new
files) and ``h5`` (opening, HDF5's errors, names, JSON and dtypes). This docstring is the format's
reference.

Run file (format 1), written by one ``RunWriter`` and read by any number of ``RunReader``s::

    /                             attrs: lossatlas_format="run", format_version=1, model, data,
                                         optimizer, attrs (JSON strings), loss, created_at,
                                         lossatlas_version, run_id, spec_signatures,
                                         checksums="checkpoints/digest"
    /checkpoints/step             (K,) int64, fill -1: the commit marker, grown last
    /checkpoints/has_optimizer    (K,) uint8: row k carries optimizer state
    /checkpoints/params/<key>     (K, *shape) in the tensor's dtype, chunk (1, *shape)
    /checkpoints/buffers/<key>    likewise (BatchNorm running stats, num_batches_tracked, ...)
    /checkpoints/optimizer/<param>/<state>   likewise (Adam's exp_avg, exp_avg_sq, step)
    /checkpoints/digest           (K, T) uint64, fill 0: column ``digest_column`` (an attr of each
                                  tensor dataset) of row k is the 64-bit BLAKE2b of that tensor's row k
    /checkpoints/attrs/<name>     (K,) float64, NaN where a checkpoint did not give it (epoch, lr)
    /log/step                     (N,) int64, fill -1; /log/<name> (N,) float64, NaN where absent

Checkpoint k is the row k of every ``/checkpoints`` dataset; a dataset created after the run
started carries ``first_row`` (the first row it holds). Every tensor dataset carries
``torch_dtype``; h5py has no bfloat16 (nor float8), so those tensors are stored as their raw bits
(uint16 / uint8) and viewed back on reading: every dtype round-trips bit for bit. A '/' in a key
is written as '%2F' (and '%' as '%25'). Nothing is pickled: specs and metadata are JSON.
``spec_signatures`` is the JSON ``{role: signature}`` of the model and data specs that name a
factory: HMAC-SHA256 under the writing user's key, so that user's readers build them without
``--trust-factory`` ("{}" when none is signed; see ``lossatlas.trust``).

Integrity: every checkpoint tensor row has a checksum, written before the commit and checked on
every read, so a truncated or corrupted file (a missing chunk reads as zeros, and HDF5's own
fletcher32 passes an all-zero chunk) raises a UserError naming the step and the tensor instead of
handing out zeros; ``RunReader.verify()`` checks every checkpoint. One (K, T) dataset holds all
checksums, so a checkpoint costs one more dataset write. A file shorter than its superblock says
(and no writer attached) is refused as truncated unless read to verify it. Files from before
checksums (no ``checksums`` attr) read as before, reported "unverified".

Live reading and crash safety (``recovery``): the writer runs in HDF5 SWMR mode (libver="latest").
A row is written and flushed in every dataset before ``/checkpoints/step`` (``/log/step``) grows, so
a reader, or a file left by a writer killed with SIGKILL, shows exactly the checkpoints and log rows
committed before. The file is built under a temporary name (``.<name>.tmp-<pid>``; the temporaries
of dead processes are removed by the next writer) and linked into place before SWMR starts, so a
kill never leaves a stub. SWMR cannot create datasets, so when a new name appears (first
checkpoint, a new log name) the writer closes the file, reopens it without SWMR, creates the
datasets and restarts SWMR; HDF5's file locks keep readers out meanwhile (readers retry). Only a
kill inside that short window can damage the file (declare log names up front with ``log_names=``
to keep windows to the first checkpoint and log flush). Readers open the file per call: with
``swmr=True`` while a writer is attached, plainly otherwise (an SWMR read retries a damaged block
for ever); a file whose writer was killed (flags left set) or that was truncated is read through a
view with HDF5's "open for write" flags cleared and the end of file fixed, never modified. The
writer holds an exclusive ``flock`` on ``<file>.lock`` (holding its pid): the kernel drops it when
the writer dies, so ``writer_attached()`` is False after a kill, and a stale sidecar is harmless.
A checkpoint that would not fit on the disk is refused before HDF5 writes it (HDF5 crashes on a
full disk).

Results file (format 2; format 1 is read too), one group per (probe, config key, step)::

    /                             attrs: lossatlas_format="results", format_version=2, run_fingerprint
    /<probe>/<key>/<step>/        step zero-padded to 10 digits, or "none"; one dataset per value and
                                  coord; every axis of every dataset has an HDF5 dimension scale, so
                                  each group is a netCDF-4 group (xarray with engine="h5netcdf", netCDF-C):
                                  a 1-D coord named like a value's axis is that axis' scale, any other
                                  axis a coordinate-less scale (attr role="dimension", no data, NAME
                                  "This is a netCDF dimension but not a netCDF variable." + length),
                                  named as the axis or, where that name is taken or has another length
                                  in the group, "<axis>_<value>"; the HDF5 dimension label is the axis
                                  name; bool arrays are uint8 and strings variable-length UTF-8, with
                                  attr ``dtype`` saying so; each value's and coord's attr ``digest`` is
                                  the checksum of its dtype, shape and bytes. Format 1 had no scale on
                                  an axis without coords (a group netCDF readers refuse).
                                  attrs: config, meta, dims (JSON), data_fingerprint, lossatlas_version,
                                         elapsed_s, status ("complete" | "partial"), written_at,
                                         digest (of these attrs and the dataset names)

Every change of a results file is copy-on-write under an exclusive ``flock`` on ``<file>.lock``:
the file is read into memory, changed there, written to ``.<name>.tmp-<pid>``, synced and renamed
over the original (creation links it, never clobbering a file made meanwhile). A failure (a full
disk, a kill) leaves every earlier result as it was, and writers in several processes all land.
HDF5 itself never meets the disk during a change. Reading checks the checksums.
"""

from __future__ import annotations

from lossatlas.store.h5 import FORMAT_VERSION, LOCK_WAIT_S
from lossatlas.store.integrity import same_file, written_aside
from lossatlas.store.locks import writer_attached
from lossatlas.store.results import STATUSES, ResultsStore, default_results_path
from lossatlas.store.runfile import Checkpoint, RunReader, RunWriter, file_kind, open_run

__all__ = [
    "FORMAT_VERSION", "LOCK_WAIT_S", "STATUSES", "Checkpoint", "ResultsStore", "RunReader", "RunWriter",
    "default_results_path", "file_kind", "open_run", "same_file", "writer_attached", "written_aside",
]
