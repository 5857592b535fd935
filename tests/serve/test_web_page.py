"""The web page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
the notice is visible, the embedded base model opens in completion mode (and says so) and continues a
completion-style prompt with its greedy text, a chat question gets a streamed answer equal to the model's
greedy answer, and the
RG1_UNCR chest DICOM gets a de-identified preview, with the window choice reaching the server; the recipe
picker uploads a CT series as several files, and localize's boxes are drawn over the image."""

from __future__ import annotations

import re
import shutil

import pydicom
import pytest
from PIL import Image

from medgem.notice import NOTICE

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
                                       "chromium-driver)")
QUESTION = "What does a chest X-ray show?"
PROMPT = "Pneumonia is an infection of the"


def ask(browser, wait, text: str) -> str:
    """Send `text` from the page and return the answer once it has finished streaming (each step of it is
    kept in window.updates)."""
    browser.find_element(By.ID, "question").send_keys(text)
    browser.execute_script("""
        window.updates = [];
        new MutationObserver(() => {
          const answers = document.querySelectorAll('.msg.assistant span');
          if (answers.length) window.updates.push(answers[answers.length - 1].textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    """)
    before = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant span"))
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant span")) > before
               and d.find_element(By.ID, "send").is_enabled() and d.find_element(By.ID, "stop").get_attribute("disabled"))
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant span")[-1].get_attribute("textContent")


@pytest.fixture()
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_chat_streams_and_dicom_preview(browser, text_server, real_pipe, chest_dicom, tmp_path):
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    browser.get(text_server)
    notice = browser.find_element(By.ID, "notice")
    assert notice.is_displayed() and NOTICE in notice.text
    wait.until(lambda d: d.find_element(By.ID, "model").text == "gemma-3-270m")

    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("12")
    # A base model opens in completion mode and says so: a completion-style prompt gets a sensible answer.
    mode = Select(browser.find_element(By.ID, "mode"))
    wait.until(lambda d: mode.first_selected_option.get_attribute("value") == "completion")
    assert "completion" in mode.first_selected_option.text and browser.find_element(By.ID, "mode-hint").is_displayed()
    expected = real_pipe.complete([PROMPT], raw=True, max_new_tokens=12, temperature=0)[0].text
    assert ask(browser, wait, PROMPT) == expected and len(re.findall(r"[A-Za-z]{3,}", expected)) >= 3

    mode.select_by_value("chat")  # the chat turns, streamed as they are generated
    expected = real_pipe.complete([[{"role": "user", "content": QUESTION}]], max_new_tokens=12, temperature=0)[0].text
    assert ask(browser, wait, QUESTION) == expected
    growing = [u for u in browser.execute_script("return window.updates") if u]
    assert len(set(growing)) >= 3, f"the answer did not stream: {growing}"
    assert all(expected.startswith(u) for u in growing)

    browser.find_element(By.ID, "file").send_keys(chest_dicom)
    wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
    image = browser.find_element(By.ID, "preview-img")
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    wait.until(lambda d: d.execute_script("return document.getElementById('preview-img').naturalWidth") > 0)
    summary = browser.find_element(By.ID, "summary").text
    assert "CR" in summary and "1841 × 1955" in summary and "YES" in summary
    header = pydicom.dcmread(chest_dicom, stop_before_pixels=True)
    page = browser.find_element(By.TAG_NAME, "body").text
    assert str(header.PatientName) not in page and header.PatientID not in page

    Select(browser.find_element(By.ID, "window")).select_by_value("lung")  # a CT preset on a radiograph
    wait.until(lambda d: d.find_element(By.ID, "image-error").is_displayed())
    assert "needs a CT image" in browser.find_element(By.ID, "image-error").text
    Select(browser.find_element(By.ID, "window")).select_by_value("")
    wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
    assert browser.find_element(By.ID, "notice").is_displayed()

    shot = tmp_path / "medgem-web-page.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as png:
        darkest, brightest = png.convert("L").getextrema()
        assert png.size[0] >= 1000 and brightest - darkest > 100  # a rendered page, not a blank one
    print(f"screenshot: {shot}")


def test_recipe_picker_and_localization_overlay(browser, serve, scripted_pipe, tiny_long, series_writer, tmp_path):
    """The recipe picker shapes the upload (several files for a series, tissue and procedure for a slide), a
    CT series goes as a ct recipe, and localize's boxes (message.boxes, in the image's pixels) are drawn over
    the image where the model put them, on a non-square image."""
    import medgem
    from medgem.processing.recipes import build
    from medgem.serve.settings import ServeSettings

    Image.new("RGB", (200, 100), (70, 70, 70)).save(tmp_path / "cxr.png")
    # x 20..120, y 10..60 of the 200 x 100 image = x 100..600, y 300..550 of the padded 0..1000 square
    reply = 'Final Answer: ```json\n[{"box_2d": [300, 100, 550, 600], "label": "right clavicle"}]\n```'
    prompt = build("localize", "right clavicle", source=str(tmp_path / "cxr.png")).messages
    pipe = scripted_pipe(prompt, reply, like=medgem.load(tiny_long, dtype="float32"))  # a context for the prompt
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    with serve(pipe, ServeSettings(model_name="scripted")) as url:
        browser.get(url)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "scripted")
        Select(browser.find_element(By.ID, "mode")).select_by_value("chat")
        recipe = Select(browser.find_element(By.ID, "recipe"))
        file_input = browser.find_element(By.ID, "file")

        recipe.select_by_value("wsi")
        assert browser.find_element(By.ID, "tissue").is_displayed() and file_input.get_attribute("multiple")
        assert ".svs" in file_input.get_attribute("accept") and not browser.find_element(By.ID, "window").is_displayed()

        recipe.select_by_value("ct")  # a series: several DICOM files in one upload
        assert not browser.find_element(By.ID, "tissue").is_displayed()
        assert "series" in browser.find_element(By.ID, "recipe-hint").text
        (tmp_path / "ct").mkdir()
        series = series_writer(tmp_path / "ct", 3)
        file_input.send_keys("\n".join(str(p) for p in series.values()))
        wait.until(lambda d: "3 file(s)" in d.find_element(By.ID, "files").text)
        assert ask(browser, wait, "Any lesion?") and not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert "[ct: 3 file(s)]" in browser.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].text

        recipe.select_by_value("localize")
        assert not file_input.get_attribute("multiple")
        file_input.send_keys(str(tmp_path / "cxr.png"))
        wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        ask(browser, wait, "right clavicle")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .overlay .box"))
        geometry = browser.execute_script("""
            const figure = document.querySelector('.msg.assistant .overlay');
            const img = figure.querySelector('img').getBoundingClientRect();
            const box = figure.querySelector('.box').getBoundingClientRect();
            return [img.width, img.height, (box.left - img.left) / img.width, (box.top - img.top) / img.height,
                    box.width / img.width, box.height / img.height, figure.querySelector('.box span').textContent];
        """)
        width, height, *fractions, label = geometry
        assert width == pytest.approx(2 * height, rel=0.02) and label == "right clavicle"
        assert fractions == pytest.approx([0.10, 0.10, 0.50, 0.50], abs=0.02)  # the box where the model put it
        assert "box(es) from the answer" in browser.find_element(By.CSS_SELECTOR, ".overlay figcaption").text
        assert browser.find_element(By.ID, "notice").is_displayed() and NOTICE in browser.find_element(By.ID, "notice").text
        browser.execute_script("document.querySelector('.msg.assistant .overlay').scrollIntoView()")
        shot = tmp_path / "medgem-web-overlay.png"
        assert browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
