"""`BackgroundModelCollection`: one background model per bin of observing conditions.

A collection gives a run the model of its conditions (`~BackgroundModelCollection.model_for`,
`~BackgroundModelCollection.assign`, `~BackgroundModelCollection.to_store_inputs`) and is
written to FITS with one BinTable HDU per bin (the IRF's own ``to_table_hdu``), bin edges and
centres in its header.
"""

import logging
import numpy as np
import astropy.units as u
from astropy.io import fits
from astropy.table import Table
from gammapy.irf import Background2D, Background3D
from gammapy.utils.scripts import make_path
from .condition_bins import (
    AZIMUTH,
    DERIVED_COLUMNS,
    DEFAULT_INTERPOLATE,
    MUONEFF,
    ZENITH,
    _bin_name,
    _bin_weights,
    _describe_bin,
    _from_interpolation_variable,
    assign_bins,
    column_values,
    interpolation_variable,
    interpolation_weights,
    source_columns,
)
from .corrections import NUMBERS, ConditionCorrection
from .histograms import RATE_UNIT

__all__ = ["BackgroundModelCollection"]

log = logging.getLogger(__name__)

# FITS keywords of a collection (8 characters at most, so no HIERARCH cards)
_COLLECTION_KEY = "BKGCOLL"
# energy at which CORRFAC and BKG_NORM report an energy-dependent correction factor
_NORM_ENERGY = 1 * u.TeV


def _expand(values, ndim):
    """An energy-axis array shaped to broadcast against (energy, spatial...) data."""
    return np.reshape(values, (-1,) + (1,) * (ndim - 1))


class BackgroundModelCollection:
    """Background models in bins of observing conditions, and the model for any run.

    Parameters
    ----------
    models : list of `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`
        One model per bin, in C order over the bins of the columns (the last column varies
        fastest). With corrections, the models are the rates at the corrections' references.
    bin_edges : dict of {str: `~numpy.ndarray`}
        Bin edges of each column, in the column's unit (deg for ZEN_PNT). Empty for a single model.
    centres : dict of {str: `~numpy.ndarray`}, optional
        Centre of each bin of each column, in the column's unit: the livetime-weighted mean of
        the runs' interpolation variable (cos(zenith) for ZEN_PNT) over all runs in that bin of
        the column, turned back into the column's unit. Default is None (middle of the edges).
    interpolate : tuple of str, optional
        Columns interpolated between centres; the others are looked up. Default is ("ZEN_PNT",
        "MUONEFF") where binned.
    corrections : list of `ConditionCorrection`, optional
        Rate corrections. Default is None.
    units : dict of {str: str}, optional
        Unit of each column. Default is None ("deg" for ZEN_PNT and AZ_PNT, else "").
    runs : `~astropy.table.Table`, optional
        Runs that built the collection: OBS_ID, BKG_BIN and LIVETIME. Default is None.

    Examples
    --------
    >>> from gammapy.data import DataStore
    >>> from bkgtemplate.conditions import ObservingConditionsEstimator
    >>> data_store = DataStore.from_dir("$GAMMAPY_DATA/hess-dl3-dr1")
    >>> table = data_store.obs_table
    >>> off = table["OBS_ID"][table["TARGET_NAME"] == "Off data"]
    >>> collection = ObservingConditionsEstimator().run(data_store, off)  # doctest: +SKIP
    >>> bkg = collection.model_for(zenith=30, muoneff=0.95, AZ_PNT=180)  # doctest: +SKIP
    >>> collection.write("bkg-collection.fits", overwrite=True)  # doctest: +SKIP
    """

    def __init__(self, models, bin_edges, centres=None, interpolate=None, corrections=None, units=None, runs=None):
        self.bin_edges = {column: np.asarray(edges, dtype=float) for column, edges in (bin_edges or {}).items()}
        for column, edges in self.bin_edges.items():
            if len(edges) < 2 or np.any(np.diff(edges) <= 0):
                raise ValueError(f"Bin edges of {column} must be increasing with at least one bin, got {edges}.")
        models = list(models)
        if len(models) != int(np.prod(self.shape)):
            raise ValueError(f"{len(models)} models for {int(np.prod(self.shape))} bins of shape {self.shape}.")
        if not all(isinstance(model, (Background2D, Background3D)) for model in models):
            raise TypeError("Models must be gammapy Background2D or Background3D.")
        if any(model.axes != models[0].axes or type(model) is not type(models[0]) for model in models):
            raise ValueError("All models of a collection must have the same kind and axes.")
        self.models = models
        units = dict(units or {})
        self.units = {
            column: units.get(column, "deg" if column in (ZENITH, AZIMUTH) else "") for column in self.columns
        }
        centres = dict(centres or {})
        self.centres = {}
        for column, edges in self.bin_edges.items():
            default = _from_interpolation_variable(
                column, 0.5 * (interpolation_variable(column, edges[:-1]) + interpolation_variable(column, edges[1:]))
            )
            self.centres[column] = np.asarray(centres.get(column, default), dtype=float)
        if interpolate is None:
            interpolate = DEFAULT_INTERPOLATE
        unknown = [c for c in interpolate if c not in self.bin_edges and c not in DEFAULT_INTERPOLATE]
        if unknown:
            raise ValueError(f"Cannot interpolate in {unknown}: binned columns are {self.columns}.")
        self.interpolate = tuple(column for column in self.columns if column in interpolate)
        self.corrections = list(corrections or [])
        self.runs = runs

    @property
    def columns(self):
        """Binned columns, in order."""
        return list(self.bin_edges)

    @property
    def shape(self):
        """Number of bins of each column."""
        return tuple(len(edges) - 1 for edges in self.bin_edges.values())

    @property
    def n_bins(self):
        """Number of bins (and models)."""
        return len(self.models)

    @property
    def condition_columns(self):
        """Columns whose values a run's model needs: the binned and the corrected ones."""
        return list(dict.fromkeys(self.columns + [correction.column for correction in self.corrections]))

    def _norm_energy_index(self):
        edges = self.models[0].axes["energy"].edges
        return int(np.clip(np.searchsorted(edges, _NORM_ENERGY, side="right") - 1, 0, len(edges) - 2))

    @property
    def bin_names(self):
        """HDU name of each bin, e.g. "BKG_ZEN_PNT0" ("BKG_ALL" for a single model)."""
        return [_bin_name(self.columns, np.unravel_index(i, self.shape)) for i in range(self.n_bins)]

    @property
    def bin_labels(self):
        """Readable label of each bin, e.g. "ZEN_PNT [0, 20) deg" (for plot legends)."""
        if not self.columns:
            return ["all runs"] * self.n_bins
        return [_describe_bin(self.bin_edges, self.units, i) for i in range(self.n_bins)]

    def __str__(self):
        lines = [f"BackgroundModelCollection: {self.n_bins} {type(self.models[0]).__name__} models"]
        for column in self.columns:
            how = "interpolated" if column in self.interpolate else "looked up"
            unit = f" {self.units[column]}" if self.units[column] else ""
            lines.append(
                f"  {column}: edges {np.round(self.bin_edges[column], 4).tolist()}{unit}, "
                f"centres {np.round(self.centres[column], 4).tolist()}{unit} ({how})"
            )
        lines += [f"  correction: {correction}" for correction in self.corrections]
        return "\n".join(lines)

    def __repr__(self):
        return str(self)

    def _values(self, values, required):
        """Values per column from keywords (derived columns from their sources), as float arrays."""
        out = {}
        for column in required:
            sources = source_columns(column)
            if values.get(column) is None and sources != (column,) and all(values.get(s) is not None for s in sources):
                derive = DERIVED_COLUMNS[column][1]
                out[column] = np.atleast_1d(derive(*self._values(values, sources).values()))
                continue
            if values.get(column) is None:
                alternative = f" (or for {' and '.join(sources)})" if sources != (column,) else ""
                raise ValueError(f"Give a value for {column}{alternative}: the collection needs {required}.")
            value = values[column]
            if isinstance(value, u.Quantity):
                value = value.to_value(self.units.get(column) or ("deg" if column in (ZENITH, AZIMUTH) else ""))
            out[column] = np.atleast_1d(np.asarray(value, dtype=float))
        return out

    def weights(self, values):
        """Bins and weights that make the model of given conditions.

        Parameters
        ----------
        values : dict of {str: `~numpy.ndarray`}
            Value of every binned column (in its unit) for each of ``n`` runs.

        Returns
        -------
        bins : `~numpy.ndarray` of int
            Flat bin indices, shape ``(n, 2 ** n_interpolated)``.
        weights : `~numpy.ndarray`
            Weights, same shape, summing to 1 for each run.
        """
        values = self._values(values, self.columns)
        centres_x = {column: interpolation_variable(column, self.centres[column]) for column in self.columns}
        return _bin_weights(self.bin_edges, centres_x, self.interpolate, values)

    def correction_factor(self, values):
        """Product of the corrections for each run and energy bin, shape ``(n, n_energy)`` (1 without corrections).

        Parameters
        ----------
        values : dict of {str: `~numpy.ndarray`}
            Value of every corrected column (in its unit) for each of ``n`` runs.

        Returns
        -------
        factor : `~numpy.ndarray`
            Correction factor.
        """
        values = self._values(values, [correction.column for correction in self.corrections])
        n = max((len(v) for v in values.values()), default=1)
        factor = np.ones((n, self.models[0].axes["energy"].nbin))
        for correction in self.corrections:
            factor = factor * correction.factor(values[correction.column]).reshape(n, -1)
        return factor

    def model_for(self, zenith=None, muoneff=None, **values):
        """The background model of one set of observing conditions.

        Interpolated columns are interpolated linearly in the rate between the two nearest bin
        centres (in cos(zenith) for ZEN_PNT), clipped at the first and last centre; other
        columns take the bin that holds the value (the nearest bin outside all bins).
        Corrections multiply the result.

        Parameters
        ----------
        zenith : float or `~astropy.units.Quantity`, optional
            Zenith angle (ZEN_PNT), in deg. Default is None.
        muoneff : float, optional
            Optical efficiency (MUONEFF). Default is None.
        **values : float
            Values of other binned or corrected columns, by column name (e.g. ``AZ_PNT=180``).

        Returns
        -------
        bkg : `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`
            The model, with the conditions and the weights in its meta.
        """
        values = dict(values)
        if zenith is not None:
            values[ZENITH] = zenith
        if muoneff is not None:
            values[MUONEFF] = muoneff
        values = {column: v[0] for column, v in self._values(values, self.condition_columns).items()}
        bins, weights = self.weights({column: values[column] for column in self.columns})
        factor = self.correction_factor(values)[0]
        return self._combine(bins[0], weights[0], factor, values)

    def _combine(self, bins, weights, factor, values):
        # Per energy bin, only the models measured there (at or above their EMEASMIN) share
        # the weight: a high-zenith bin has no exposure near low-zenith thresholds, and its
        # extrapolated rate there should not dilute a measured one.
        energy = self.models[0].axes["energy"].edges[:-1].to_value("TeV")
        used = [(self.models[int(i)], w) for i, w in zip(bins, weights) if w > 0]
        measured = np.array([w * (energy >= m.meta.get("EMEASMIN", 0.0) * (1 - 1e-6)) for m, w in used])
        plain = np.array([np.full(len(energy), w) for _, w in used])
        norm = measured.sum(axis=0)
        effective = np.where(norm > 0, measured / np.where(norm > 0, norm, 1), plain)
        data = sum(_expand(w, m.data.ndim) * m.quantity.to_value(RATE_UNIT) for (m, _), w in zip(used, effective))
        template = self.models[int(bins[np.argmax(weights)])]
        meta = {key: value for key, value in template.meta.items() if not key.startswith(("BIN", "NRUNS", "NEVENTS"))}
        meta.update({f"COND{i + 1}": column for i, column in enumerate(values)})
        meta.update({f"CONDVAL{i + 1}": float(value) for i, value in enumerate(values.values())})
        meta.update({f"WBIN{i + 1}": int(index) for i, index in enumerate(bins)})
        meta.update({f"WEIGHT{i + 1}": float(weight) for i, weight in enumerate(weights)})
        meta["CORRFAC"] = float(factor[self._norm_energy_index()])
        meta["EMEASMIN"] = min(m.meta.get("EMEASMIN", 0.0) for m, _ in used)
        return type(template)(
            axes=template.axes,
            data=data * _expand(factor, data.ndim),
            unit=RATE_UNIT,
            meta=meta,
            fov_alignment=template.fov_alignment,
        )

    def assign(self, obs_table):
        """Bins, interpolation partners and weights of runs.

        Parameters
        ----------
        obs_table : `~astropy.table.Table`
            Obs index (or rows of it) with OBS_ID and the binned and corrected columns.

        Returns
        -------
        assignment : `~astropy.table.Table`
            One row per run: OBS_ID; BKG_BIN (flat index of the bin holding the run, nearest
            bin outside all bins) and BKG_HDU (its HDU name); per binned column ``<col>_BIN``;
            per interpolated column ``<col>_LO`` and ``<col>_HI`` (partner bins) and ``<col>_W``
            (weight of ``<col>_HI``); BKG_NORM, the product of the corrections (at 1 TeV for
            energy-dependent ones).
        """
        n = len(obs_table)
        values = {column: column_values(obs_table, column) for column in self.columns}
        table = Table({"OBS_ID": np.asarray(obs_table["OBS_ID"], dtype=np.int64)})
        index = []
        outside = np.zeros(n, dtype=bool)
        for column in self.columns:
            idx, out = assign_bins(values[column], self.bin_edges[column])
            index.append(idx)
            outside |= out
            table[f"{column}_BIN"] = idx
            if column in self.interpolate:
                x = interpolation_variable(column, values[column])
                lo, hi, w = interpolation_weights(x, interpolation_variable(column, self.centres[column]))
                table[f"{column}_LO"], table[f"{column}_HI"], table[f"{column}_W"] = lo, hi, w
        if np.any(outside):
            log.warning(
                f"Runs {[int(i) for i in table['OBS_ID'][outside]]} lie outside the bins of {self.columns}: "
                "they get the nearest bin."
            )
        flat = np.ravel_multi_index(index, self.shape) if self.columns else np.zeros(n, dtype=int)
        table["BKG_BIN"] = flat
        table["BKG_HDU"] = [self.bin_names[i] for i in flat]
        corrected = {c.column: column_values(obs_table, c.column) for c in self.corrections}
        table["BKG_NORM"] = self.correction_factor(corrected)[:, self._norm_energy_index()] * np.ones(n)
        return table

    def to_store_inputs(self, obs_table, interpolate=True):
        """Models and assignment for `~bkgtemplate.store.write_background_store`.

        Parameters
        ----------
        obs_table : `~astropy.table.Table`
            Obs index of the store to write (every run gets a model).
        interpolate : bool, optional
            One model per run, interpolated and corrected for its conditions (HDU names
            "BKG_<OBS_ID>"). If False, one model per bin, each run taking the bin that holds it,
            without interpolation or corrections. Default is True.

        Returns
        -------
        models : dict of {str: `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`}
            Models by HDU name.
        assignment : `~astropy.table.Table`
            OBS_ID, BKG_HDU and the columns of `assign` (no name clashes with the obs index).
        """
        assignment = self.assign(obs_table)
        if not interpolate:
            if self.corrections or self.interpolate:
                log.warning(
                    "One model per bin: the interpolation and the corrections "
                    f"({', '.join(c.column for c in self.corrections) or 'none'}) are not applied to the runs."
                )
            models = {name: model for name, model in zip(self.bin_names, self.models)}
            return models, assignment
        needed = self.condition_columns
        values = {column: column_values(obs_table, column) for column in needed}
        centres_x = {column: interpolation_variable(column, self.centres[column]) for column in self.columns}
        bins, weights = _bin_weights(
            self.bin_edges, centres_x, self.interpolate, {c: values[c] for c in self.columns}, n=len(obs_table)
        )
        factors = self.correction_factor({c.column: values[c.column] for c in self.corrections})
        factors = np.broadcast_to(factors, (len(obs_table), factors.shape[1]))
        models = {}
        names = []
        for i, obs_id in enumerate(assignment["OBS_ID"]):
            name = f"BKG_{int(obs_id)}"
            models[name] = self._combine(bins[i], weights[i], factors[i], {c: values[c][i] for c in needed})
            names.append(name)
        assignment["BKG_HDU"] = names
        return models, assignment

    def to_hdulist(self):
        """FITS HDUs: a primary HDU describing the collection, one HDU per bin, and the runs.

        Returns
        -------
        hdulist : `~astropy.io.fits.HDUList`
            Primary HDU (columns, interpolation), one BinTable HDU per bin (the model's
            ``to_table_hdu`` with BINCOLn, BINIDXn, BINLOn, BINHIn, BINCENn, BINUNIn in the
            header), a CORRECTIONS table (one row per correction: COLUMN, KIND,
            ENERGY_DEPENDENT, and REFERENCE, COEFFICIENT, CLIP_MIN, CLIP_MAX per energy bin)
            if there are corrections, and a RUNS table if known.
        """
        primary = fits.PrimaryHDU()
        header = primary.header
        header[_COLLECTION_KEY] = (True, "bkgtemplate background model collection")
        header["NBINCOL"] = (len(self.columns), "number of binned obs-index columns")
        for i, column in enumerate(self.columns, start=1):
            header[f"BINCOL{i}"] = column
            header[f"BINUNI{i}"] = self.units[column]
            header[f"NBIN{i}"] = len(self.bin_edges[column]) - 1
            header[f"INTERP{i}"] = (column in self.interpolate, "interpolated between bin centres")
        header["NCORR"] = (len(self.corrections), "number of rate corrections (CORRECTIONS HDU)")
        hdus = [primary]
        for flat, (name, model) in enumerate(zip(self.bin_names, self.models)):
            hdu = model.to_table_hdu()
            hdu.name = name
            index = np.unravel_index(flat, self.shape) if self.columns else ()
            for i, (column, idx) in enumerate(zip(self.columns, index), start=1):
                hdu.header[f"BINCOL{i}"] = column
                hdu.header[f"BINUNI{i}"] = self.units[column]
                hdu.header[f"BINIDX{i}"] = int(idx)
                hdu.header[f"BINLO{i}"] = float(self.bin_edges[column][idx])
                hdu.header[f"BINHI{i}"] = float(self.bin_edges[column][idx + 1])
                hdu.header[f"BINCEN{i}"] = float(self.centres[column][idx])
            hdus.append(hdu)
        if self.corrections:
            hdus.append(fits.BinTableHDU(self._corrections_table(), name="CORRECTIONS"))
        if self.runs is not None:
            hdus.append(fits.BinTableHDU(Table(self.runs), name="RUNS"))
        return fits.HDUList(hdus)

    def _corrections_table(self):
        n_energy = self.models[0].axes["energy"].nbin
        table = Table(
            {
                "COLUMN": [c.column for c in self.corrections],
                "KIND": [c.kind for c in self.corrections],
                "ENERGY_DEPENDENT": [c.energy_dependent for c in self.corrections],
            }
        )
        for name in NUMBERS:
            table[name.upper()] = [np.broadcast_to(getattr(c, name), (n_energy,)) for c in self.corrections]
        return table

    @staticmethod
    def _corrections_from_table(table):
        corrections = []
        for row in table:
            arrays = {name: np.array(row[name.upper()], dtype=float) for name in NUMBERS}
            if not row["ENERGY_DEPENDENT"]:
                arrays = {name: float(array[0]) for name, array in arrays.items()}
            corrections.append(ConditionCorrection(column=str(row["COLUMN"]), kind=str(row["KIND"]), **arrays))
        return corrections

    def write(self, filename, overwrite=False):
        """Write to a FITS file (see `to_hdulist`).

        Parameters
        ----------
        filename : str or `~pathlib.Path`
            File name.
        overwrite : bool, optional
            Overwrite an existing file. Default is False.
        """
        self.to_hdulist().writeto(make_path(filename), overwrite=overwrite)

    @classmethod
    def from_hdulist(cls, hdulist):
        """Collection from the HDUs written by `to_hdulist`."""
        header = hdulist[0].header
        if not header.get(_COLLECTION_KEY, False):
            raise ValueError(f"Not a background model collection: the primary header has no {_COLLECTION_KEY}.")
        columns = [header[f"BINCOL{i}"] for i in range(1, header["NBINCOL"] + 1)]
        units = {column: header[f"BINUNI{i}"] for i, column in enumerate(columns, start=1)}
        shape = tuple(header[f"NBIN{i}"] for i in range(1, len(columns) + 1))
        interpolate = tuple(column for i, column in enumerate(columns, start=1) if header[f"INTERP{i}"])
        corrections = cls._corrections_from_table(Table.read(hdulist["CORRECTIONS"])) if header["NCORR"] else []
        names = [_bin_name(columns, np.unravel_index(i, shape)) for i in range(int(np.prod(shape)))]
        edges = {column: np.full(n + 1, np.nan) for column, n in zip(columns, shape)}
        centres = {column: np.full(n, np.nan) for column, n in zip(columns, shape)}
        models = []
        for name in names:
            hdu = hdulist[name]
            kind = Background3D if hdu.header.get("HDUCLAS4") == "BKG_3D" else Background2D
            models.append(kind.from_table(Table.read(hdu)))
            for i, column in enumerate(columns, start=1):
                idx = hdu.header[f"BINIDX{i}"]
                edges[column][idx], edges[column][idx + 1] = hdu.header[f"BINLO{i}"], hdu.header[f"BINHI{i}"]
                centres[column][idx] = hdu.header[f"BINCEN{i}"]
        runs = Table.read(hdulist["RUNS"]) if "RUNS" in hdulist else None
        return cls(models, edges, centres, interpolate=interpolate, corrections=corrections, units=units, runs=runs)

    @classmethod
    def read(cls, filename):
        """Read a collection written by `write`.

        Parameters
        ----------
        filename : str or `~pathlib.Path`
            File name.

        Returns
        -------
        collection : `BackgroundModelCollection`
            The collection.
        """
        with fits.open(make_path(filename), memmap=False) as hdulist:
            return cls.from_hdulist(hdulist)

