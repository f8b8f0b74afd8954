"""Field-of-view geometry and exclusion regions, against astropy, gammapy and hand values."""

import numpy as np
import astropy.units as u
from astropy.coordinates import AltAz, EarthLocation, HADec, SkyCoord
from astropy.time import Time
from numpy.testing import assert_allclose
import pytest
from gammapy.maps import MapAxis, WcsGeom
from gammapy.utils.coordinates import FoVAltAzFrame, sky_to_fov
from regions import CirclePixelRegion, CircleSkyRegion, PixCoord, RectangleSkyRegion
from bkgtemplate.geometry import (
    Exclusion,
    fov_altaz_to_radec,
    fov_radec_to_altaz,
    fov_radec_to_sky,
    fov_solid_angle,
    offset_solid_angle,
    parallactic_angle,
    sky_to_fov_altaz,
    sky_to_fov_radec,
)

HESS = EarthLocation(lon=16.5002 * u.deg, lat=-23.2718 * u.deg, height=1835 * u.m)


@pytest.fixture
def events():
    rng = np.random.default_rng(42)
    pointing = SkyCoord(228.61, -58.77, unit="deg")
    sky = pointing.directional_offset_by(rng.uniform(0, 360, 200) * u.deg, rng.uniform(0, 2.5, 200) * u.deg)
    return pointing, sky


def test_sky_to_fov_radec_matches_gammapy(events):
    pointing, sky = events
    lon, lat = sky_to_fov_radec(sky.ra.rad, sky.dec.rad, pointing.ra.rad, pointing.dec.rad)
    lon_ref, lat_ref = sky_to_fov(sky.ra, sky.dec, pointing.ra, pointing.dec)
    assert_allclose(np.rad2deg(lon), lon_ref.to_value("deg"), atol=1e-10)
    assert_allclose(np.rad2deg(lat), lat_ref.to_value("deg"), atol=1e-10)

    ra, dec = fov_radec_to_sky(lon, lat, pointing.ra.rad, pointing.dec.rad)
    assert_allclose(ra, sky.ra.rad, atol=1e-12)
    assert_allclose(dec, sky.dec.rad, atol=1e-12)


@pytest.mark.parametrize("ra_dec", [(228.61, -58.77), (329.72, -30.23), (83.63, 22.01)])
def test_altaz_rotation_matches_gammapy_frame(ra_dec):
    """The closed-form field rotation agrees with astropy's full AltAz transform to < 0.002 deg."""
    rng = np.random.default_rng(1)
    pointing = SkyCoord(*ra_dec, unit="deg")
    sky = pointing.directional_offset_by(rng.uniform(0, 360, 50) * u.deg, rng.uniform(0, 2.5, 50) * u.deg)
    time = Time("2004-03-26T03:00:00", scale="tt")
    origin = pointing.transform_to(AltAz(location=HESS, obstime=time))
    reference = sky.transform_to(FoVAltAzFrame(origin=origin, location=HESS, obstime=time))

    hadec = pointing.transform_to(HADec(location=HESS, obstime=time))
    angle = parallactic_angle(hadec.ha.rad, hadec.dec.rad, HESS.lat.rad)
    lon, lat = sky_to_fov_radec(sky.ra.rad, sky.dec.rad, pointing.ra.rad, pointing.dec.rad)
    lon_altaz, lat_altaz = fov_radec_to_altaz(lon, lat, angle)

    assert_allclose(np.rad2deg(lon_altaz), reference.fov_lon.wrap_at(180 * u.deg).deg, atol=2e-3)
    assert_allclose(np.rad2deg(lat_altaz), reference.fov_lat.deg, atol=2e-3)

    lon_back, lat_back = fov_altaz_to_radec(lon_altaz, lat_altaz, angle)
    assert_allclose(lon_back, lon, atol=1e-12)
    assert_allclose(lat_back, lat, atol=1e-12)


def test_parallactic_angle_hand_values():
    # on the meridian the vertical points along the declination circle: angle 0 or 180 deg
    lat = np.deg2rad(-23.27)
    assert_allclose(parallactic_angle(0.0, np.deg2rad(-60), lat), 0.0, atol=1e-12)
    assert_allclose(np.abs(parallactic_angle(0.0, np.deg2rad(10), lat)), np.pi, atol=1e-12)
    # east and west of the meridian the angle changes sign
    east, west = parallactic_angle(np.array([-0.3, 0.3]), np.deg2rad(-60), lat)
    assert_allclose(east, -west)


def test_offset_solid_angle_exact():
    axis = MapAxis.from_edges([0, 1, 2.5] * u.deg, name="offset")
    solid_angle = offset_solid_angle(axis)
    assert solid_angle.unit == u.sr
    r1, r2 = np.deg2rad(1), np.deg2rad(2.5)
    assert_allclose(solid_angle.value, [2 * np.pi * (1 - np.cos(r1)), 2 * np.pi * (np.cos(r1) - np.cos(r2))], rtol=1e-14)
    # a hemisphere
    axis = MapAxis.from_edges([0, 90] * u.deg, name="offset")
    assert_allclose(offset_solid_angle(axis).value, [2 * np.pi], rtol=1e-14)


def test_fov_solid_angle_exact():
    lon = MapAxis.from_edges([-180, 0, 180] * u.deg, name="fov_lon")
    lat = MapAxis.from_edges([-90, 0, 90] * u.deg, name="fov_lat")
    solid_angle = fov_solid_angle(lon, lat)
    assert solid_angle.shape == (2, 2)
    assert_allclose(solid_angle.value, np.pi, rtol=1e-14)
    # a small bin away from the equator: dlon * (sin lat2 - sin lat1)
    lon = MapAxis.from_edges([0, 0.1] * u.deg, name="fov_lon")
    lat = MapAxis.from_edges([2.0, 2.1] * u.deg, name="fov_lat")
    expected = np.deg2rad(0.1) * (np.sin(np.deg2rad(2.1)) - np.sin(np.deg2rad(2.0)))
    assert_allclose(fov_solid_angle(lon, lat).value, [[expected]], rtol=1e-12)


def test_sky_to_fov_altaz_is_the_rotated_radec_offset(events):
    pointing, sky = events
    args = sky.ra.rad, sky.dec.rad, pointing.ra.rad, pointing.dec.rad
    angle = np.linspace(-3, 3, len(sky))
    assert_allclose(sky_to_fov_altaz(*args, angle), fov_radec_to_altaz(*sky_to_fov_radec(*args), angle), rtol=0, atol=1e-13)


def test_exclusion_circles_and_other_regions(events):
    pointing, sky = events
    center = pointing.directional_offset_by(30 * u.deg, 1 * u.deg)
    args = sky.ra.rad, sky.dec.rad, pointing.ra.rad, pointing.dec.rad
    circle = Exclusion(CircleSkyRegion(center, 0.6 * u.deg))
    assert_allclose(circle.excluded(*args), sky.separation(center) < 0.6 * u.deg)
    box = Exclusion([RectangleSkyRegion(center, 1.2 * u.deg, 1.2 * u.deg)])
    assert 0 < box.excluded(*args).sum() < len(sky)
    # a field 5 deg away cannot touch the circle; the pointing's own field does
    far = pointing.directional_offset_by(210 * u.deg, 5 * u.deg)
    assert circle.touches(pointing.ra.rad, pointing.dec.rad, np.deg2rad(2.5))
    assert not circle.touches(far.ra.rad, far.dec.rad, np.deg2rad(2.5))


def test_exclusion_mask_follows_gammapy_convention(events):
    pointing, sky = events
    geom = WcsGeom.create(skydir=pointing, width=6 * u.deg, binsz=0.02)
    center = pointing.directional_offset_by(30 * u.deg, 1 * u.deg)
    mask = ~geom.region_mask([CircleSkyRegion(center, 0.6 * u.deg)])  # True = kept, as in gammapy
    excluded = Exclusion(mask).excluded(sky.ra.rad, sky.dec.rad, pointing.ra.rad, pointing.dec.rad)
    near_edge = np.abs(sky.separation(center).deg - 0.6) < 0.03
    assert_allclose(excluded[~near_edge], (sky.separation(center) < 0.6 * u.deg)[~near_edge])
    with pytest.raises(TypeError, match="The exclusion mask must be boolean"):
        Exclusion(mask.copy(data=mask.data.astype(float)))


@pytest.mark.parametrize(
    "exclusion, got",
    [
        (CirclePixelRegion(PixCoord(10, 10), 3), "CirclePixelRegion"),
        (SkyCoord(83.6, 22.0, unit="deg"), "SkyCoord"),
        ([CircleSkyRegion(SkyCoord(83.6, 22.0, unit="deg"), 0.5 * u.deg), SkyCoord(80, 20, unit="deg")], "SkyCoord"),
        ([CirclePixelRegion(PixCoord(10, 10), 3)], "CirclePixelRegion"),
        ([], "list"),
    ],
)
def test_exclusion_of_the_wrong_kind(exclusion, got):
    with pytest.raises(TypeError) as error:
        Exclusion(exclusion)
    message = str(error.value)
    assert "\n" not in message and "exclusion must" in message and got in message
