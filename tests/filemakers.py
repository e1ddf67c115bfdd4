"""Files that tests make: a decompression-bomb PNG, DICOM files (with or without pixel data,
MONOCHROME1/2, 8/12/16 bit).

`dicom_bytes` imports pydicom only when called (a dependency; the suite still runs without it, and
DICOM tests skip there).
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np

DIGITAL_XRAY = "1.2.840.10008.5.1.4.1.1.1.1"  # SOP class: digital X-ray image storage, for presentation


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def dicom_bytes(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", bits_allocated: int | None = None,
                bits_stored: int | None = None, rows: int | None = None, columns: int | None = None,
                **attributes) -> bytes:
    """A DICOM file (explicit VR little endian, digital X-ray) holding `pixels` as stored values.

    `bits_allocated` (8 or 16) defaults to the array's item size; the pixels are stored as uint8 or
    uint16 to match. `bits_stored` (default: bits_allocated) sets HighBit too, e.g. 12 for a
    scanner's 12-bit values in 16-bit words. With `pixels=None` the file is a header only: no pixel
    module, just `rows`/`columns` when given. `attributes` are set on the dataset as they are named
    (e.g. PatientName="Anonymous", Modality="DX").
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = DIGITAL_XRAY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    if pixels is not None:
        rows = pixels.shape[0] if rows is None else rows
        columns = pixels.shape[1] if columns is None else columns
        bits_allocated = bits_allocated or 8 * pixels.dtype.itemsize
        bits_stored = bits_stored or bits_allocated
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = \
            bits_allocated, bits_stored, bits_stored - 1, 0
        ds.PixelData = pixels.astype(np.uint8 if bits_allocated == 8 else np.uint16).tobytes()
    if rows is not None:
        ds.Rows = rows
    if columns is not None:
        ds.Columns = columns
    for name, value in attributes.items():
        setattr(ds, name, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
